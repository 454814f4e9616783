"""RandAugment on the full image, computed only as far as the random crop that follows looks.

The strong view runs RandAugment on the whole image and then keeps a random crop of it: with the
paper's crops (local crops cover 5-25 % of the image) most of what the geometric ops resample is thrown
away, and those ops were the largest single cost of the loader. Here RandAugment's ops are recorded
instead of run; :class:`WindowedResizedCrop` draws its box as ``RandomResizedCrop`` does, and the
recorded ops are computed over the window from the image's top-left corner to the box's bottom-right
one, each reading the part of its input that window depends on:

- per-pixel ops (invert, posterize, solarize, colour, brightness): the same window;
- sharpness (a 3 × 3 smoothing): one more row and column;
- affine ops (rotate, shear, translate) with bilinear or bicubic resampling: as far as the window's
  preimage reaches, plus 3 pixels, the reach of a bicubic kernel;
- anything else (autocontrast, equalize and contrast read statistics of the whole image; nearest
  resampling; unknown ops): the whole image, computed right away.

Windows start at the origin so that every op sees the coordinates it sees on the full image: PIL
computes each output pixel from its own coordinates, so the pixels are bit-identical to running the ops
on the whole image and cropping. (Windows around the box alone would save more, but shifting an affine
map to them changes its rounding, and samples that fall exactly on a pixel boundary, which a shear of
0.3 produces on whole rows, then move by one grey level.)

The random draws are RandAugment's own, in the same order (an affine op runs on a stand-in image that
records the map PIL would apply), so a seeded view draws the same ops, magnitudes, interpolations and
crop box as the eager pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

__all__ = ["AFFINE_OPS", "AffineProbe", "DeferredImage", "DeferredOp", "WindowedResizedCrop"]

Box = tuple[int, int, int, int]  # left, upper, right, lower (PIL's crop box)
Corner = tuple[int, int]  # right, lower: the window from (0, 0) to there

# timm's RandAugment op names by what an output pixel depends on
_PER_PIXEL = {
    "Invert",
    "Posterize",
    "PosterizeIncreasing",
    "PosterizeOriginal",
    "Solarize",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "Color",
    "ColorIncreasing",
    "Brightness",
    "BrightnessIncreasing",
    "Desaturate",
}
_NEIGHBOURHOOD = {"Sharpness", "SharpnessIncreasing"}  # PIL's 3 × 3 smoothing filter
AFFINE_OPS = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
_WINDOWED_RESAMPLING = {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}
# a bicubic kernel reads 2 pixels either side of a sample point: one more for the pixel-centre offset
_RESAMPLING_REACH = 3


def _clip(right: int, lower: int, size: tuple[int, int]) -> Corner:
    # at least one pixel: an op whose samples all fall outside the image reads none, and any will do
    return (min(size[0], max(1, right)), min(size[1], max(1, lower)))


class _PixelStep:
    """An op whose output pixel depends on its input pixel within ``margin`` pixels."""

    def __init__(self, fn: Callable[..., Image.Image], args: tuple, kwargs: dict, margin: int) -> None:
        self.fn, self.args, self.kwargs, self.margin = fn, args, kwargs, margin

    def source_corner(self, corner: Corner, size: tuple[int, int]) -> Corner:
        return _clip(corner[0] + self.margin, corner[1] + self.margin, size)

    def render(self, image: Image.Image, corner: Corner) -> Image.Image:
        out = self.fn(image, *self.args, **self.kwargs)
        return out if out.size == corner else out.crop((0, 0, *corner))


class _AffineStep:
    """PIL's affine transform: the output pixel centred at (x, y) samples the input at A · (x, y, 1)."""

    def __init__(self, matrix: Sequence[float], resample: int, fillcolor: Any) -> None:
        self.matrix, self.resample, self.fillcolor = tuple(matrix), resample, fillcolor

    def source_corner(self, corner: Corner, size: tuple[int, int]) -> Corner:
        a, b, c, d, e, f = self.matrix
        centres = [(x + 0.5, y + 0.5) for x in (0, corner[0] - 1) for y in (0, corner[1] - 1)]
        right = max(a * x + b * y + c for x, y in centres)
        lower = max(d * x + e * y + f for x, y in centres)
        return _clip(math.ceil(right) + _RESAMPLING_REACH, math.ceil(lower) + _RESAMPLING_REACH, size)

    def render(self, image: Image.Image, corner: Corner) -> Image.Image:
        affine = Image.Transform.AFFINE
        return image.transform(corner, affine, self.matrix, self.resample, fillcolor=self.fillcolor)


class DeferredImage:
    """``base`` and the ops still to run on it; :meth:`render` computes the result inside one box."""

    def __init__(self, base: Image.Image) -> None:
        self.base = base
        self.steps: list[_PixelStep | _AffineStep] = []

    @property
    def size(self) -> tuple[int, int]:
        return self.base.size  # RandAugment's ops keep the image size

    def render(self, box: Box) -> Image.Image:
        """The pixels the recorded ops give inside ``box``: equal to running them all, then cropping."""
        corners = [(box[2], box[3])]
        for step in reversed(self.steps):
            corners.append(step.source_corner(corners[-1], self.size))
        corners.reverse()
        image = self.base.crop((0, 0, *corners[0]))
        for step, corner in zip(self.steps, corners[1:], strict=True):
            image = step.render(image, corner)
        return image.crop(box)

    def full(self) -> Image.Image:
        return self.render((0, 0, *self.size))


class AffineProbe(Image.Image):
    """Stands in for the image in one of timm's geometric ops and records the affine map PIL would
    apply; the op makes its own random draws (the interpolation among them) as it would on the image.
    """

    def __init__(self, size: tuple[int, int], mode: str) -> None:
        super().__init__()
        self._size, self._mode = size, mode
        self.step: _AffineStep | None = None
        self.whole: Callable[[Image.Image], Image.Image] | None = None

    def transform(  # type: ignore[override]
        self,
        size: tuple[int, int],
        method: Any,
        data: Any = None,
        resample: Any = 0,
        fill: int = 1,
        fillcolor: Any = None,
    ) -> AffineProbe:
        if method != Image.Transform.AFFINE or tuple(size) != self.size:
            raise NotImplementedError(f"a {method} transform to {size} is not an in-place affine map")
        if resample in _WINDOWED_RESAMPLING:
            self.step = _AffineStep(data[:6], resample, fillcolor)
        else:
            self.whole = lambda image: image.transform(size, method, data, resample, fill, fillcolor)
        return self

    def copy(self) -> AffineProbe:  # PIL's rotate by 0 degrees
        return self

    def transpose(self, method: Any) -> AffineProbe:  # PIL's rotate by 90, 180 or 270 degrees
        self.whole = lambda image: image.transpose(method)
        return self


class DeferredOp:
    """The function of timm's RandAugment op ``name``, recording itself on a :class:`DeferredImage`
    when it can be computed over a window later, and running on the whole image when it cannot.
    """

    def __init__(self, name: str, fn: Callable[..., Image.Image]) -> None:
        self.name, self.fn = name, fn
        if name in AFFINE_OPS:
            self.kind = "affine"
        elif name in _PER_PIXEL or name in _NEIGHBOURHOOD:
            self.kind = "pixel"
        else:
            self.kind = "whole"
        self.margin = 1 if name in _NEIGHBOURHOOD else 0

    def __call__(
        self, image: Image.Image | DeferredImage, *args: Any, **kwargs: Any
    ) -> Image.Image | DeferredImage:
        if self.kind == "whole":
            return self.fn(image.full() if isinstance(image, DeferredImage) else image, *args, **kwargs)
        deferred = image if isinstance(image, DeferredImage) else DeferredImage(image)
        if self.kind == "pixel":
            deferred.steps.append(_PixelStep(self.fn, args, kwargs, self.margin))
            return deferred
        probe = AffineProbe(deferred.size, deferred.base.mode)
        self.fn(probe, *args, **kwargs)
        if probe.whole is not None:
            return probe.whole(deferred.full())
        if probe.step is not None:  # None: the identity (a rotation by 0 degrees)
            deferred.steps.append(probe.step)
        return deferred

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.kind})"


class WindowedResizedCrop(T.RandomResizedCrop):
    """``RandomResizedCrop`` that, given a :class:`DeferredImage`, computes only the box it keeps.

    The box is drawn from the image size exactly as ``RandomResizedCrop`` draws it, then cropped and
    resized by torchvision's own functions, so a plain image gets ``RandomResizedCrop``'s result.
    """

    def forward(self, img: Image.Image | DeferredImage | Tensor) -> Image.Image | Tensor:
        if not isinstance(img, DeferredImage):
            return super().forward(img)
        top, left, height, width = self.get_params(img.base, self.scale, self.ratio)
        window = img.render((left, top, left + width, top + height))
        return F.resize(window, self.size, self.interpolation, antialias=self.antialias)
