"""The device backend's pixels: every view of a batch rendered on the training device, each sample with
the parameters its loader drew (:mod:`mugs.data.device_params`), then finished as on the CPU backend.

Per crop position, RandAugment runs first, on each row's whole image, layer by layer as the reference
runs it: a geometric op warps the image (PIL's affine transform: its bilinear or bicubic as drawn, the
data mean where it uncovers), a pixel op maps its grey levels, reading the statistics of the image as
it is by then. Then one bicubic ``grid_sample`` of those images through each view's crop map gives the
resized crop and the flip; it samples ``s × s`` points per output pixel and averages them
(``s`` = the largest source-pixel stride of the batch, at most 4), an antialiased resize like PIL's.
Then colour jitter in each sample's order, grayscale, blur and solarize; after each op the grey levels
are integers again as in PIL (``ImageEnhance``'s blends truncate, resampling and conversions round).
Erasing and normalisation are :class:`~mugs.data.transforms.CropFinisher`'s.

torch's own ops throughout: torchvision's tensor functions take one factor per call, not one per
sample, and kornia, measured against these (docs/benchmarks.md), would be a dependency for the same
arithmetic. Which rows an op applies to is host data (the parameters arrive on the host), so rows are
selected with index tensors of known size: nothing is read back from the device.

Known departures from the reference, bounded by tests/test_device_augment.py: torch's bicubic kernel
(a = -0.75) where PIL's is a = -0.5, in the warps and the crop; the crop's antialiasing is a box average
of bicubic samples, not PIL's separable filter; PIL's Gaussian blur is an extended box filter, here a
Gaussian kernel of the same σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mugs.data.device_params import RAND_AUGMENT_OPS, WARP_MODES, DeviceBatch, ViewParams
from mugs.data.transforms import CropFinisher, MultiCropBatch, rand_augment_fill

__all__ = ["DeviceAugmentation", "ImageStats", "image_stats", "render_views"]

_MAX_SUPERSAMPLING = 4
_BLUR_REACH = 3.0  # kernel half-width in σ
_MAX_BLUR_SIGMA = 2.0
_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion


class ImageStats(NamedTuple):
    """Per image of a batch and channel: lowest and highest grey level, ``[256]`` histogram; the mean
    of its "L" conversion. RandAugment's AutoContrast, Equalize and Contrast read them."""

    low: Tensor
    high: Tensor
    histogram: Tensor
    grey_mean: Tensor


def image_stats(images: Tensor, sizes: Tensor) -> ImageStats:
    """:class:`ImageStats` of a batch's float ``images`` over their own ``sizes`` (not the padding)."""
    rows, channels, height, width = images.shape
    in_width = torch.arange(width, device=images.device) < sizes[:, :1]
    in_height = torch.arange(height, device=images.device) < sizes[:, 1:]
    inside = (in_height[:, :, None] & in_width[:, None, :])[:, None]
    low = torch.where(inside, images, math.inf).amin((2, 3))
    high = torch.where(inside, images, -math.inf).amax((2, 3))
    weights = inside.expand_as(images).flatten(2).to(images.dtype)
    histogram = images.new_zeros(rows, channels, 256).scatter_add_(2, images.flatten(2).long(), weights)
    grey_mean = (_grey(images) * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3))
    return ImageStats(low, high, histogram, grey_mean)


def _per_row(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _quantise(x: Tensor) -> Tensor:
    return x.clamp_(0, 255).round_()


def _truncate(x: Tensor) -> Tensor:
    return x.clamp_(0, 255).floor_()


def _grey(x: Tensor) -> Tensor:
    red, green, blue = x.split(1, dim=1)
    return (red * _LUMA[0] + green * _LUMA[1] + blue * _LUMA[2]).round_()


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` (ImageEnhance), factors per row: its float result is
    truncated to an integer, not rounded (0.4 grey levels a blend, measured)."""
    return _truncate(degenerate + _per_row(factor) * (x - degenerate))


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = torch.pow(2.0, 8 - bits.clamp(0, 8))  # 0 bits: black, as in the reference
    return torch.floor(x / _per_row(step)) * _per_row(step)


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= _per_row(threshold), 255 - x, x)


def _solarize_add(x: Tensor, add: Tensor) -> Tensor:
    return torch.where(x < 128, (x + _per_row(add)).clamp_(max=255), x)


def _contrast(x: Tensor, factor: Tensor, grey_mean: Tensor | None = None) -> Tensor:
    """PIL's ImageEnhance.Contrast: a blend with the grey mean (the crop's when not given), rounded."""
    if grey_mean is None:
        grey_mean = _grey(x).mean((1, 2, 3))
    mean = _per_row(grey_mean.add(0.5).floor_())
    return _blend(mean.expand_as(x), x, factor)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's SMOOTH filter (centre weight 5 of 13) as the degenerate image; border pixels kept."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = F.conv2d(x, kernel / 13, groups=3).round_()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def _autocontrast(x: Tensor, _: Tensor, stats: ImageStats) -> Tensor:
    """PIL's ``ImageOps.autocontrast`` per channel, stretching the image's range to 0-255."""
    low, high = stats.low[..., None, None], stats.high[..., None, None]
    stretched = ((x - low) * (255 / (high - low).clamp(min=1))).floor_().clamp_(0, 255)
    return torch.where(high > low, stretched, x)


def _equalize(x: Tensor, _: Tensor, stats: ImageStats) -> Tensor:
    """PIL's ``ImageOps.equalize`` per channel: a lookup table from the image's histogram."""
    histogram = stats.histogram
    top = torch.arange(256, device=x.device).mul(histogram > 0).amax(2, keepdim=True)
    step = ((histogram.sum(2, keepdim=True) - histogram.gather(2, top)) / 255).floor_()
    below = histogram.cumsum(2) - histogram  # pixels under each level
    lut = ((below + (step / 2).floor_()) / step.clamp(min=1)).floor_().clamp_(max=255)
    equalised = lut.gather(2, x.flatten(2).long()).view_as(x).to(x.dtype)
    return torch.where(step[..., None] > 0, equalised, x)  # a flat channel stays as it is


_WHOLE_IMAGE = {"AutoContrast", "Equalize", "Contrast"}  # these read statistics of the whole image
_RAND_AUGMENT: dict[str, Callable[..., Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda x, _: 255 - x,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda x, factor: _blend(_grey(x).expand_as(x), x, factor),
    "Contrast": lambda x, factor, stats: _contrast(x, factor, stats.grey_mean),
    "Brightness": lambda x, factor: _blend(torch.zeros_like(x), x, factor),
    "Sharpness": _sharpness,
}


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue rotated by ``shift`` turns through PIL's 8-bit HSV, as torchvision's PIL path does it: hue and
    saturation truncated to 0-255, ``int(shift · 255)`` added modulo 256, and back with PIL's rounding
    (in floating point, the round trip made the views 0.4 grey levels darker, measured)."""
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    chroma = (value - low).clamp_(min=1)  # where it is 0, saturation is 0 and hue unused
    red_gap, green_gap, blue_gap = (value - r) / chroma, (value - g) / chroma, (value - b) / chroma
    hue = torch.where(
        r == value,
        blue_gap - green_gap,
        torch.where(g == value, 2 + red_gap - blue_gap, 4 + green_gap - red_gap),
    )
    hue = ((hue / 6 + 1) % 1).mul_(255).floor_()
    saturation = torch.where(value > low, ((value - low) / value.clamp(min=1)).mul_(255).floor_(), 0)
    hue = (hue + _per_row(torch.trunc(shift * 255))[:, 0]).remainder_(256).mul_(6 / 255)
    sector = hue.floor()
    fraction, saturation = hue - sector, saturation / 255
    low = (value * (1 - saturation)).add_(0.5).floor_()
    falling = (value * (1 - saturation * fraction)).add_(0.5).floor_()
    rising = (value * (1 - saturation * (1 - fraction))).add_(0.5).floor_()
    # per channel, its level in each of the six hue sectors (colorsys's table)
    table = (value, falling, low, low, rising, value)
    table += (rising, value, value, falling, low, low)
    table += (low, low, rising, value, value, falling)
    levels = torch.stack(table, 1).unflatten(1, (3, 6))
    sector = sector.long().remainder_(6)[:, None, None].expand(-1, 3, 1, -1, -1)
    rgb = levels.gather(2, sector).squeeze(2)
    return torch.where(saturation[:, None] > 0, rgb, value[:, None].expand_as(rgb))


_JITTER: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (  # torchvision's ColorJitter op indices
    _RAND_AUGMENT["Brightness"],
    _contrast,
    _RAND_AUGMENT["Color"],
    _hue,
)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """A separable Gaussian of each row's σ, edges repeated, as one grouped convolution per axis."""
    reach = math.ceil(_BLUR_REACH * _MAX_BLUR_SIGMA)
    offsets = torch.arange(-reach, reach + 1, dtype=x.dtype, device=x.device)
    weights = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [rows · 3, taps]
    rows, channels, height, width = x.shape
    flat = x.reshape(1, rows * channels, height, width)
    flat = F.conv2d(
        F.pad(flat, (reach, reach, 0, 0), mode="replicate"), weights[:, None, None], groups=rows * 3
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, reach, reach), mode="replicate"), weights[:, None, :, None], groups=rows * 3
    )
    return _quantise(flat.view_as(x))


def _rows_of(value: Tensor, rows: Tensor | None, like: Tensor) -> Tensor:
    """``rows`` of a host or device tensor (all when ``None``), on ``like``'s device, floats as its."""
    if rows is not None:
        value = value.index_select(0, rows.to(value.device, non_blocking=True))
    return value.to(like.device, like.dtype, non_blocking=True)


def _on_rows(x: Tensor, mask: Tensor, op: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``op`` on the rows where the host tensor ``mask`` is True, with those rows of ``args``."""
    rows = mask.nonzero().flatten()
    if not len(rows):
        return x
    if len(rows) == len(mask):
        return op(x, *(_rows_of(arg, None, x) for arg in args))
    on_device = rows.to(x.device, non_blocking=True)
    picked = (_rows_of(arg, rows, x) for arg in args)
    return x.index_copy(0, on_device, op(x.index_select(0, on_device), *picked))


def _sample_points(height: int, width: int, supersampling: int, maps: Tensor) -> Tensor:
    """``[B, h, w, 2]`` input coordinates of an output's ``h × w`` sample points (``supersampling`` per
    pixel and axis, at their centres) through each row's ``[2, 3]`` map."""
    steps = [
        (torch.arange(n * supersampling, dtype=maps.dtype, device=maps.device) + 0.5) / supersampling
        for n in (height, width)
    ]
    y, x = torch.meshgrid(*steps, indexing="ij")
    points = torch.stack([x, y, torch.ones_like(x)], -1)  # [h, w, 3]
    return torch.einsum("bij,yxj->byxi", maps, points)


def _resample(images: Tensor, points: Tensor, mode: str) -> Tensor:
    """``images`` (padded to their common size) sampled at the continuous coordinates ``points``."""
    height, width = images.shape[-2:]
    grid = torch.stack([points[..., 0] * (2 / width) - 1, points[..., 1] * (2 / height) - 1], -1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def _warp(x: Tensor, maps: Tensor, sizes: Tensor, fill: Tensor, *, mode: str) -> Tensor:
    """A geometric RandAugment op on each row's whole image, as PIL's affine transform: each pixel
    samples the image at its map's point, or is ``fill`` where that falls outside the image."""
    points = _sample_points(*x.shape[-2:], 1, maps)
    outside = ((points < 0) | (points >= sizes.view(-1, 1, 1, 2))).any(-1)[:, None]
    return _quantise(torch.where(outside, fill, _resample(x, points, mode)))


def _pixel_op(x: Tensor, args: Tensor, sizes: Tensor, *, name: str) -> Tensor:
    """RandAugment pixel op ``name`` on whole images, those that read statistics reading theirs."""
    extra = (image_stats(x, sizes),) if name in _WHOLE_IMAGE else ()
    return _RAND_AUGMENT[name](x, args, *extra)


def _rand_augment(images: Tensor, sizes: Tensor, params: ViewParams, fill: Tensor) -> Tensor:
    """Each row's image after its RandAugment layers, run in order on the whole image as the reference
    runs them: a geometric op warps it with its interpolation, a pixel op maps its grey levels."""
    for layer in range(params.ra_ops.shape[1]):
        warps, ops = params.ra_warp[:, layer], params.ra_ops[:, layer]
        for index in warps.unique().tolist():
            if index:
                warp = partial(_warp, fill=fill, mode=WARP_MODES[index])
                images = _on_rows(images, warps == index, warp, params.ra_maps[:, layer], sizes)
        for index in ops.unique().tolist():
            if index:
                op = partial(_pixel_op, name=RAND_AUGMENT_OPS[index])
                images = _on_rows(images, ops == index, op, params.ra_args[:, layer], sizes)
    return images


def render_views(images: Tensor, sizes: Tensor, params: ViewParams, size: int, fill: Tensor) -> Tensor:
    """``[B, 3, size, size]`` float grey levels of one crop position's views of ``images`` (float,
    on the device; ``sizes`` their (width, height) and ``fill`` the ``[1, 3, 1, 1]`` colour of the
    pixels RandAugment's geometric ops uncover, on the device), drawn as ``params`` (on the host).
    Nothing goes from the host to the device but those parameters' rows, asynchronously."""
    images = _rand_augment(images, sizes, params, fill)
    stride = params.source_map[:, :, :2].norm(dim=1).max().item()  # host tensor: no device sync
    supersampling = min(_MAX_SUPERSAMPLING, max(1, math.ceil(stride - 1e-6)))
    maps = params.source_map.to(images.device, images.dtype, non_blocking=True)
    x = _resample(images, _sample_points(size, size, supersampling, maps), "bicubic")
    return _weak_colour(_quantise(F.avg_pool2d(x, supersampling)), params)


def _weak_colour(x: Tensor, params: ViewParams) -> Tensor:
    """Colour jitter in each row's order, grayscale, blur and solarize (threshold 128), as drawn."""
    for slot in range(4):
        for op, jitter_op in enumerate(_JITTER):
            x = _on_rows(x, params.jitter_order[:, slot] == op, jitter_op, params.jitter[:, op])
    x = _on_rows(x, params.grayscale, lambda rows: _grey(rows).expand_as(rows))
    x = _on_rows(x, params.blur_sigma > 0, _blur, params.blur_sigma)
    return _on_rows(x, params.solarize, lambda rows: torch.where(rows >= 128, 255 - rows, rows))


class DeviceAugmentation:
    """Renders a :class:`DeviceBatch`'s views on ``device`` and finishes them like the CPU backend's
    crops: a list of normalised ``[B, 3, S, S]`` tensors, one per crop position."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        *,
        global_size: int,
        local_size: int,
    ) -> None:
        self.finisher = CropFinisher(mean, std, device)
        self.device = self.finisher.device
        # made once: a tensor built from host values during a step would be a synchronous copy
        self.fill = (
            torch.tensor(rand_augment_fill(mean), dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        )
        self.global_size, self.local_size = global_size, local_size

    def __call__(self, batch: DeviceBatch) -> list[Tensor]:
        images = batch.images.to(self.device, non_blocking=True).to(torch.float32)
        sizes = batch.sizes.to(self.device, non_blocking=True)
        sizes_per_position = [self.global_size] * 4 + [self.local_size] * (len(batch.params) - 4)
        crops = [
            render_views(images, sizes, params, size, self.fill)
            for params, size in zip(batch.params, sizes_per_position, strict=True)
        ]
        boxes = [params.erase_box for params in batch.params]
        return self.finisher(MultiCropBatch(crops, boxes, batch.erase_noise, batch.weak_flags, batch.labels))
