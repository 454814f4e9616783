"""The device backend's pixels: every view of a batch rendered on the training device, each sample with
the parameters its loader drew (:mod:`mugs.data.device_params`), then finished as on the CPU backend.

Per crop position, RandAugment runs first, on each row's whole image, layer by layer as the reference
runs it: a geometric op warps the image (PIL's affine transform: bilinear or bicubic as drawn, the
data mean where it uncovers), a pixel op maps its grey levels, reading the statistics of the image as
it is by then. Then each row's crop box is resized as PIL resizes it (antialiased bicubic, as two
separable passes of per-row weights: batched matrix products), the flip folded into the weights. Then
colour jitter in each sample's order, grayscale, blur and solarize. After each op the grey levels are
integers again, as PIL leaves them (its blends and affine transforms truncate; its resampling and
conversions round halves up). Erasing and normalisation are
:class:`~mugs.data.transforms.CropFinisher`'s.

torch's own ops throughout: torchvision's tensor functions take one factor per call, not one per
sample, and kornia, measured against these (docs/benchmarks.md), would be a dependency for the same
arithmetic. Which rows an op applies to is host data (the parameters arrive on the host), so rows are
selected with index tensors of known size: nothing is read back from the device.

The known departure from the reference, bounded by tests/test_device_augment.py: the geometric ops'
bicubic kernel (PIL's affine transform has a = -1, torch's ``grid_sample`` a = -0.75). Everything else
is PIL's arithmetic, to a level on a few pixels in ten thousand.
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

_BLUR_PASSES = 3  # PIL's GaussianBlur: three box filters
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
    """To PIL's 8-bit levels: clipped, halves rounded up (PIL adds a half, then truncates)."""
    return x.clamp_(0, 255).add_(0.5).floor_()


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


def _box_radius(sigma: Tensor) -> Tensor:
    """PIL's ``GaussianBlur``: the fractional radius of the box filter that, in three passes, has the
    variance of a Gaussian of ``sigma`` (Gwosdek et al. 2011, as Pillow's ``_gaussian_blur_radius``)."""
    variance = sigma * sigma / _BLUR_PASSES
    whole = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    return whole + fraction


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """PIL's ``GaussianBlur`` of each row's σ: three passes of a box filter of fractional radius r
    (weight w on the 2⌊r⌋ + 1 pixels around, (1 − (2⌊r⌋ + 1) w) / 2 on the next two, w = 1 / (2r + 1)
    in PIL's 24-bit fixed point), horizontally, then three vertically, edges repeated, each pass
    rounded to 8 bits; one grouped convolution per pass."""
    radius = _box_radius(sigma.to(torch.float64))
    whole = radius.floor()
    inner = torch.floor(2**24 / (2 * radius + 1))
    outer = torch.floor((2**24 - (2 * whole + 1) * inner) / 2)
    reach = int(_box_radius(torch.tensor(_MAX_BLUR_SIGMA, dtype=torch.float64))) + 1
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64, device=x.device).abs()
    weights = torch.where(offsets <= whole[:, None], inner[:, None], 0.0)
    weights = torch.where(offsets == whole[:, None] + 1, outer[:, None], weights) / 2**24
    weights = weights.to(x.dtype).repeat_interleave(3, 0)  # [rows · 3, taps]
    rows, channels, height, width = x.shape
    flat = x.reshape(1, rows * channels, height, width)
    for padding, kernel in (
        ((reach, reach, 0, 0), weights[:, None, None]),
        ((0, 0, reach, reach), weights[:, None, :, None]),
    ):
        for _ in range(_BLUR_PASSES):
            flat = _quantise(F.conv2d(F.pad(flat, padding, mode="replicate"), kernel, groups=rows * 3))
    return flat.view_as(x)


def _rows_of(value: Tensor, rows: Tensor | None, like: Tensor) -> Tensor:
    """``rows`` of a host or device tensor (all when ``None``), on ``like``'s device, floats as its."""
    if rows is not None:
        value = value.index_select(0, rows.to(value.device, non_blocking=True))
    return value.to(like.device, like.dtype, non_blocking=True)


def _on_rows(x: Tensor, mask: Tensor, op: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``op`` on the rows where the host tensor ``mask`` is True, with those rows of ``args``; they are
    written into ``x`` in place (only those rows move: a copy of a batch of whole images per op cost
    more than the ops)."""
    rows = mask.nonzero().flatten()
    if not len(rows):
        return x
    if len(rows) == len(mask):
        return op(x, *(_rows_of(arg, None, x) for arg in args))
    on_device = rows.to(x.device, non_blocking=True)
    picked = (_rows_of(arg, rows, x) for arg in args)
    return x.index_copy_(0, on_device, op(x.index_select(0, on_device), *picked))


def _warp(x: Tensor, maps: Tensor, sizes: Tensor, fill: Tensor, *, mode: str) -> Tensor:
    """A geometric RandAugment op on each row's whole image, as PIL's affine transform: each pixel
    samples the image at its map's point (from its centre), truncated to an integer as PIL does
    (rounding made these views 0.5 levels brighter), or is ``fill`` where that falls outside the image.
    PIL's bilinear is torch's; its bicubic kernel has a = −1, torch's a = −0.75."""
    height, width = x.shape[-2:]  # padded
    rows = torch.arange(height, dtype=maps.dtype, device=maps.device) + 0.5
    cols = torch.arange(width, dtype=maps.dtype, device=maps.device) + 0.5
    y, z = torch.meshgrid(rows, cols, indexing="ij")
    points = torch.einsum("bij,yxj->byxi", maps, torch.stack([z, y, torch.ones_like(z)], -1))
    outside = ((points < 0) | (points >= sizes.view(-1, 1, 1, 2))).any(-1)[:, None]
    grid = torch.stack([points[..., 0] * (2 / width) - 1, points[..., 1] * (2 / height) - 1], -1)
    warped = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return _truncate(torch.where(outside, fill, warped))


def _pixel_op(x: Tensor, args: Tensor, sizes: Tensor, *, name: str) -> Tensor:
    """RandAugment pixel op ``name`` on whole images, those that read statistics reading theirs."""
    extra = (image_stats(x, sizes),) if name in _WHOLE_IMAGE else ()
    return _RAND_AUGMENT[name](x, args, *extra)


def _rand_augment(images: Tensor, sizes: Tensor, params: ViewParams, fill: Tensor) -> Tensor:
    """Each row's image after its RandAugment layers, run in order on the whole image as the reference
    runs them: a geometric op warps it with its interpolation, a pixel op maps its grey levels.
    ``images`` is left as it is (other crop positions read it); the rows with an op are copied once."""
    rows = ((params.ra_ops != 0) | (params.ra_warp != 0)).any(1).nonzero().flatten()
    if not len(rows):
        return images
    on_device = rows.to(images.device, non_blocking=True)
    augmented, sizes = images.index_select(0, on_device), sizes.index_select(0, on_device)
    for layer in range(params.ra_ops.shape[1]):
        warps, ops = params.ra_warp[rows, layer], params.ra_ops[rows, layer]
        for index in warps.unique().tolist():
            if index:
                warp = partial(_warp, fill=fill, mode=WARP_MODES[index])
                augmented = _on_rows(augmented, warps == index, warp, params.ra_maps[rows, layer], sizes)
        for index in ops.unique().tolist():
            if index:
                op = partial(_pixel_op, name=RAND_AUGMENT_OPS[index])
                augmented = _on_rows(augmented, ops == index, op, params.ra_args[rows, layer], sizes)
    return images.index_copy(0, on_device, augmented)


def _resize_weights(scale: Tensor, offset: Tensor, size: int, length: int) -> Tensor:
    """``[B, size, length]``: PIL's antialiased bicubic resize (``Image.resize``) of each row's box on
    one axis, as weights of the input pixels. The axis's map ``x_in = scale · x_out + offset`` gives
    the box (``scale < 0``: mirrored); output pixel j reads the box's pixels x with weights
    k((x + ½ − c_j) / max(|scale|, 1)), c_j its centre and k the bicubic kernel with a = −½, normalised."""
    stride = scale.abs()[:, None, None]
    start = torch.where(scale < 0, offset + scale * size, offset).round()[:, None, None]
    outputs = torch.arange(size, dtype=scale.dtype, device=scale.device)[None, :, None]
    outputs = torch.where(scale[:, None, None] < 0, size - 1 - outputs, outputs)
    inputs = torch.arange(length, dtype=scale.dtype, device=scale.device)[None, None, :]
    t = ((inputs - start - (outputs + 0.5) * stride + 0.5) / stride.clamp(min=1)).abs()
    kernel = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, ((t - 5) * t + 8).mul_(t).sub_(4).mul_(-0.5))
    in_box = (inputs >= start) & (inputs < start + (stride * size).round())
    kernel = torch.where(in_box & (t < 2), kernel, 0)
    return kernel / kernel.sum(2, keepdim=True)


def _resized_crop(images: Tensor, maps: Tensor, size: int) -> Tensor:
    """Each row's crop box resized to ``size`` pixels as PIL resizes it: a horizontal pass rounded to
    8 bits, then a vertical one; ``maps`` (``[B, 2, 3]``, axis-aligned) give the boxes."""
    height, width = images.shape[-2:]
    across = _resize_weights(maps[:, 0, 0], maps[:, 0, 2], size, width)
    down = _resize_weights(maps[:, 1, 1], maps[:, 1, 2], size, height)
    rows = _quantise(torch.einsum("bcyx,bjx->bcyj", images, across))
    return _quantise(torch.einsum("biy,bcyj->bcij", down, rows))


def render_views(images: Tensor, sizes: Tensor, params: ViewParams, size: int, fill: Tensor) -> Tensor:
    """``[B, 3, size, size]`` float grey levels of one crop position's views of ``images`` (float,
    on the device; ``sizes`` their (width, height) and ``fill`` the ``[1, 3, 1, 1]`` colour of the
    pixels RandAugment's geometric ops uncover, on the device), drawn as ``params`` (on the host).
    Nothing goes from the host to the device but those parameters' rows, asynchronously."""
    images = _rand_augment(images, sizes, params, fill)
    maps = params.source_map.to(images.device, images.dtype, non_blocking=True)
    return _weak_colour(_resized_crop(images, maps, size), params)


def _weak_colour(x: Tensor, params: ViewParams) -> Tensor:
    """Colour jitter in each row's order, grayscale, blur and solarize (threshold 128), as drawn."""
    for slot in range(4):
        for op, jitter_op in enumerate(_JITTER):
            x = _on_rows(x, params.jitter_order[:, slot] == op, jitter_op, params.jitter[:, op])
    x = _on_rows(x, params.grayscale, lambda rows: _grey(rows).repeat(1, 3, 1, 1))
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
