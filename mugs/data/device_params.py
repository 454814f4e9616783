"""The device backend's loader side: decode each image and draw every random parameter of its views.

The draws are the reference's (:class:`mugs.data.transforms.MultiCropAugmentation`): the same transform
objects supply every setting, and each view draws from Python's and torch's generators in the same
order, so a seeded sample gets the crop boxes, flips, jitter factors and order, grayscale, blur sigma,
solarize, RandAugment ops and magnitudes and erasing boxes it gets on the CPU backend. Only the pixels
are left to :mod:`mugs.data.device_augment`, on the training device, for the whole batch.

Geometry travels as affine maps from an output pixel's continuous coordinates (pixel ``i`` spans
``[i, i + 1)``) to an input's: per RandAugment layer whose op is geometric, the op's own map on the
whole image with its interpolation, and per view the crop box and its resize. The reference flips the
image before RandAugment; here the flip is folded into the maps (a geometric op's map conjugated by
the mirror, the crop's mirrored), so the device warps and crops the unflipped image to the same pixels.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from mugs.data.transforms import (
    NO_ERASING,
    MultiCropAugmentation,
    RandomErasingPatch,
    RandomGaussianBlur,
    SeededRandAugment,
)
from mugs.data.windowed import AFFINE_OPS, AffineProbe, WindowedResizedCrop

__all__ = [
    "RAND_AUGMENT_OPS",
    "WARP_MODES",
    "DeviceBatch",
    "DeviceMultiCropParams",
    "DeviceViews",
    "ViewParams",
    "collate_device",
]

# RandAugment's per-pixel ops by the device's op index (0: no op, or a geometric one), and timm's names
RAND_AUGMENT_OPS = (
    "none",
    "AutoContrast",
    "Equalize",
    "Invert",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
)
_TIMM_NAMES = {
    **{name: name for name in RAND_AUGMENT_OPS[1:]},
    "PosterizeIncreasing": "Posterize",
    "PosterizeOriginal": "Posterize",
    "SolarizeIncreasing": "Solarize",
    "ColorIncreasing": "Color",
    "ContrastIncreasing": "Contrast",
    "BrightnessIncreasing": "Brightness",
    "SharpnessIncreasing": "Sharpness",
}
_IDENTITY = np.eye(3)
# RandAugment's geometric ops by their device index (0: a pixel op): grid_sample's modes for PIL's
WARP_MODES = ("none", "bilinear", "bicubic")
_WARP_INDEX = {Image.Resampling.BILINEAR: 1, Image.Resampling.BICUBIC: 2}


class ViewParams(NamedTuple):
    """One view's parameters (numbers, sequences and arrays), or a batch's (each field a tensor, the
    views stacked along its first dimension, as :func:`collate_device` makes them).

    ``source_map`` ``[2, 3]``: the crop's output pixel coordinates to the (augmented) image's; per
    RandAugment layer, ``ra_maps`` ``[L, 2, 3]``, its geometric op's map from the image after the op to
    the image before it, and ``ra_warp`` (its interpolation: :data:`WARP_MODES`' index, 0 for a pixel op),
    ``ra_ops`` (an index of :data:`RAND_AUGMENT_OPS`, 0 for a geometric op) and ``ra_args`` (its one
    argument); ``jitter`` (brightness, contrast,
    saturation, hue factors) in ``jitter_order`` (torchvision's op indices; all -1 when not applied),
    ``grayscale``, ``blur_sigma`` (0: none), ``solarize`` and the erasing box ``(top, left, h, w)``.
    """

    source_map: Tensor
    ra_maps: Tensor
    ra_warp: Tensor
    ra_ops: Tensor
    ra_args: Tensor
    jitter: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur_sigma: Tensor
    solarize: Tensor
    erase_box: Tensor


def _matrix(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def _crop_map(box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    """Output pixel coordinates of a ``size``-pixel resized crop of ``box``, mirrored when ``flip``."""
    top, left, height, width = box
    if flip:
        return _matrix(-width / size, 0.0, left + width, 0.0, height / size, top)
    return _matrix(width / size, 0.0, left, 0.0, height / size, top)


def _view(
    source: np.ndarray,
    maps: list[np.ndarray | None],
    warps: list[int],
    ops: list[tuple[int, float]],
    layers: int,
    **colour: object,
) -> ViewParams:
    missing = layers - len(maps)
    return ViewParams(
        source_map=source[:2],
        ra_maps=np.stack([(_IDENTITY if m is None else m)[:2] for m in maps] + [_IDENTITY[:2]] * missing)
        if layers
        else np.zeros((0, 2, 3)),
        ra_warp=warps + [0] * missing,
        ra_ops=[op for op, _ in ops] + [0] * missing,
        ra_args=[arg for _, arg in ops] + [0.0] * missing,
        **colour,
    )


def _no_colour(box: tuple[int, int, int, int] = NO_ERASING) -> dict[str, object]:
    return {
        "jitter": (1.0, 1.0, 1.0, 0.0),
        "jitter_order": (-1, -1, -1, -1),
        "grayscale": False,
        "blur_sigma": 0.0,
        "solarize": False,
        "erase_box": box,
    }


class WeakViewParams:
    """The draws of a weak view (:func:`mugs.data.transforms.weak_transform`), with its settings."""

    def __init__(self, reference: T.Compose, layers: int) -> None:
        crop, flip, jitter, grayscale, blur, *solarize = reference.transforms[:-1]  # PILToTensor last
        self.crop: T.RandomResizedCrop = crop
        self.flip_prob, self.grayscale_prob = flip.p, grayscale.p
        self.jitter_prob, (self.jitter,) = jitter.p, jitter.transforms
        self.blur: RandomGaussianBlur = blur
        self.solarize_prob = solarize[0].p if solarize else 0.0
        self.layers = layers

    def __call__(self, image: Image.Image) -> tuple[ViewParams, Tensor]:
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        flip = bool(torch.rand(1) < self.flip_prob)
        colour = _no_colour()
        if not self.jitter_prob < torch.rand(1):  # torchvision's RandomApply
            jitter = self.jitter
            order, *factors = jitter.get_params(
                jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            )
            colour["jitter"], colour["jitter_order"] = tuple(factors), order.tolist()
        colour["grayscale"] = bool(torch.rand(1) < self.grayscale_prob)
        if random.random() < self.blur.prob:
            colour["blur_sigma"] = random.uniform(*self.blur.sigma)
        if self.solarize_prob > 0:
            colour["solarize"] = torch.rand(1).item() < self.solarize_prob
        source = _crop_map(box, self.crop.size[0], flip)
        return _view(source, [], [], [], self.layers, **colour), torch.empty(0)


class _Recording:
    """Stands in for the image in RandAugment: each op that runs appends ``(device op, argument)`` and,
    for a geometric op, its affine map (``None`` otherwise) and interpolation, instead of computing pixels."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.ops: list[tuple[int, float]] = []
        self.maps: list[np.ndarray | None] = []
        self.warps: list[int] = []


class _RecordedOp:
    """The function of timm's RandAugment op ``name``, recording on a :class:`_Recording`. A geometric op
    runs on an :class:`AffineProbe`, so that it makes its own draws (the interpolation among them)."""

    def __init__(self, name: str, fn: object) -> None:
        if name not in AFFINE_OPS and name not in _TIMM_NAMES:
            raise ValueError(f"augment.rand_augment: the device backend has no RandAugment op {name!r}")
        self.name, self.fn = name, fn

    def __call__(self, image: _Recording, *args: float, **kwargs: object) -> _Recording:
        if self.name in AFFINE_OPS:
            probe = AffineProbe(image.size, "RGB")
            self.fn(probe, *args, **kwargs)
            if probe.whole is not None:
                raise ValueError(
                    f"augment.rand_augment: {self.name} is not an affine map the device can apply"
                )
            image.ops.append((0, 0.0))
            if probe.step is None:  # rotate by 0 degrees
                image.maps.append(None)
                image.warps.append(0)
            else:
                image.maps.append(_matrix(*probe.step.matrix))
                image.warps.append(_WARP_INDEX[probe.step.resample])
        else:
            image.ops.append(
                (RAND_AUGMENT_OPS.index(_TIMM_NAMES[self.name]), float(args[0]) if args else 0.0)
            )
            image.maps.append(None)
            image.warps.append(0)
        return image


class StrongViewParams:
    """The draws of a strong view (:func:`mugs.data.transforms.strong_transform`), with its settings."""

    def __init__(self, reference: T.Compose) -> None:
        flip, rand_augment, crop, _, erasing = reference.transforms
        self.flip_prob = flip.p
        self.rand_augment: SeededRandAugment = copy.copy(rand_augment)
        self.rand_augment.ops = [copy.copy(op) for op in rand_augment.ops]
        for op in self.rand_augment.ops:  # the reference's deferred ops: their timm name and function
            op.aug_fn = _RecordedOp(op.aug_fn.name, op.aug_fn.fn)
        self.crop: WindowedResizedCrop = crop
        self.erasing: RandomErasingPatch = erasing
        self.layers = rand_augment.num_layers
        self.crop_shape = torch.empty(3, *crop.size)  # erasing reads only the shape

    def __call__(self, image: Image.Image) -> tuple[ViewParams, Tensor]:
        flip = bool(torch.rand(1) < self.flip_prob)
        recording = self.rand_augment(_Recording(image.size))
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        _, erase_box, noise = self.erasing(self.crop_shape)
        maps, source = recording.maps, _crop_map(box, self.crop.size[0], flip=False)
        if flip:  # the box and the ops' maps are on the flipped image: mirror them onto the unflipped one
            mirror = _matrix(-1.0, 0.0, image.size[0], 0.0, 1.0, 0.0)
            maps = [None if m is None else mirror @ m @ mirror for m in maps]
            source = mirror @ source
        colour = _no_colour(erase_box)
        return _view(source, maps, recording.warps, recording.ops, self.layers, **colour), noise


class DeviceViews(NamedTuple):
    """One image for the device backend: its uint8 ``[3, H, W]`` pixels, each view's parameters and
    erasing noise, and the weak flag."""

    image: Tensor
    params: list[ViewParams]
    erase_noise: list[Tensor]
    weak: bool


class DeviceMultiCropParams(MultiCropAugmentation):
    """:class:`MultiCropAugmentation`'s draws without its pixels: :class:`DeviceViews` of an image."""

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        layers = self.strong_global.transforms[1].num_layers
        self.weak_global1 = WeakViewParams(self.weak_global1, layers)
        self.weak_global2 = WeakViewParams(self.weak_global2, layers)
        self.weak_local = WeakViewParams(self.weak_local, layers)
        self.strong_global = StrongViewParams(self.strong_global)
        self.strong_local = StrongViewParams(self.strong_local)

    def __call__(self, image: Image.Image) -> DeviceViews:
        if image.mode != "RGB":
            image = image.convert("RGB")
        views, weak = self.draw_views(image)
        params, noise = (list(column) for column in zip(*views, strict=True))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return DeviceViews(pixels, params, noise, weak)


class DeviceBatch(NamedTuple):
    """A batch for the device backend: ``[B, 3, H, W]`` uint8 images (each padded by repeating its last
    row and column to the batch's largest), their ``[B, 2]`` (width, height), per crop position the
    stacked :class:`ViewParams` and joined erasing noise (as :class:`MultiCropBatch`), flags, labels."""

    images: Tensor
    sizes: Tensor
    params: list[ViewParams]
    erase_noise: list[Tensor]
    weak_flags: Tensor
    labels: Tensor


def _pad_edge(image: Tensor, height: int, width: int) -> Tensor:
    pad = ((0, 0), (0, height - image.shape[1]), (0, width - image.shape[2]))
    return torch.from_numpy(np.pad(image.numpy(), pad, mode="edge")) if any(p[1] for p in pad) else image


def _stack(views: list[ViewParams]) -> ViewParams:
    """One crop position's :class:`ViewParams` of a batch: each field one tensor (collating the numbers
    here, once per batch, rather than making a tensor of each in every view saves the loader time)."""
    return ViewParams(*(torch.as_tensor(np.array(field)) for field in zip(*views, strict=True)))


def collate_device(batch: Sequence[tuple[DeviceViews, int]]) -> DeviceBatch:
    """Stack ``(views, label)`` items into a :class:`DeviceBatch`."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    height = max(views.image.shape[1] for views, _ in batch)
    width = max(views.image.shape[2] for views, _ in batch)
    positions = range(len(batch[0][0].params))
    return DeviceBatch(
        images=torch.stack([_pad_edge(views.image, height, width) for views, _ in batch]),
        sizes=torch.tensor([(views.image.shape[2], views.image.shape[1]) for views, _ in batch]),
        params=[_stack([views.params[i] for views, _ in batch]) for i in positions],
        erase_noise=[torch.cat([views.erase_noise[i].flatten() for views, _ in batch]) for i in positions],
        weak_flags=torch.tensor([bool(views.weak) for views, _ in batch], dtype=torch.bool),
        labels=torch.tensor([int(label) for _, label in batch], dtype=torch.int64),
    )
