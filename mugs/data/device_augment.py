"""The device backend's pixels: every view of a batch rendered on the training device, each sample with
the parameters its loader drew (:mod:`mugs.data.device_params`), then finished as on the CPU backend.

Per crop position, one bicubic ``grid_sample`` of the batch's images through each view's composed
affine map gives the resized crop, flips and RandAugment's geometric ops at once; it samples ``s × s``
points per output pixel and averages them (``s`` = the largest source-pixel stride of the batch, at
most 4), an antialiased resize like PIL's. Then, in the reference's order, RandAugment's pixel ops
(the fill of what a geometric op uncovers, at its place in the sequence), colour jitter in each
sample's order, grayscale, blur and solarize, rounding to grey levels after each as PIL does; erasing
and normalisation are :class:`~mugs.data.transforms.CropFinisher`'s.

torch's own ops throughout: torchvision's tensor functions take one factor per call, not one per
sample, and kornia, measured against these (docs/benchmarks.md), would be a dependency for the same
arithmetic. Which rows an op applies to is host data (the parameters arrive on the host), so rows are
selected with index tensors of known size: nothing is read back from the device.

Known departures from the reference, bounded by tests/test_device_augment.py: RandAugment's pixel ops
run after the crop instead of on the whole image before it, so AutoContrast, Equalize and Contrast
take their statistics from the crop; RandAugment's geometric ops resample with the crop's bicubic
kernel (PIL's bilinear or bicubic, once more); PIL's Gaussian blur is an extended box filter, here a
Gaussian kernel of the same σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mugs.data.device_params import RAND_AUGMENT_OPS, DeviceBatch, ViewParams
from mugs.data.transforms import CropFinisher, MultiCropBatch, rand_augment_fill

__all__ = ["DeviceAugmentation", "render_views"]

_MAX_SUPERSAMPLING = 4
_BLUR_REACH = 3.0  # kernel half-width in σ
_MAX_BLUR_SIGMA = 2.0
_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion


def _per_row(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _quantise(x: Tensor) -> Tensor:
    return x.clamp_(0, 255).round_()


def _grey(x: Tensor) -> Tensor:
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True).round_()


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` (ImageEnhance), factors per row."""
    return _quantise(degenerate + _per_row(factor) * (x - degenerate))


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = torch.pow(2.0, 8 - bits.clamp(0, 8))  # 0 bits: black, as in the reference
    return torch.floor(x / _per_row(step)) * _per_row(step)


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= _per_row(threshold), 255 - x, x)


def _solarize_add(x: Tensor, add: Tensor) -> Tensor:
    return torch.where(x < 128, (x + _per_row(add)).clamp_(max=255), x)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _grey(x).mean((1, 2, 3), keepdim=True).add_(0.5).floor_()
    return _blend(mean.expand_as(x), x, factor)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's SMOOTH filter (centre weight 5 of 13) as the degenerate image; border pixels kept."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = F.conv2d(x, kernel / 13, groups=3).round_()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def _autocontrast(x: Tensor, _: Tensor) -> Tensor:
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    scale = 255 / (high - low).clamp_(min=1)
    stretched = ((x - low) * scale).floor_()
    return torch.where(high > low, stretched, x)


def _equalize(x: Tensor, _: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` per channel: a lookup table from the channel's histogram."""
    rows, channels = x.shape[:2]
    levels = x.flatten(2).long()
    histogram = torch.zeros(rows, channels, 256, device=x.device).scatter_add_(
        2, levels, torch.ones_like(levels, dtype=torch.float32)
    )
    top = torch.arange(256, device=x.device).mul(histogram > 0).amax(2, keepdim=True)
    step = ((histogram.sum(2, keepdim=True) - histogram.gather(2, top)) / 255).floor_()
    below = histogram.cumsum(2) - histogram  # pixels under each level
    lut = ((below + (step / 2).floor_()) / step.clamp(min=1)).floor_().clamp_(max=255)
    equalised = lut.gather(2, levels).view_as(x).to(x.dtype)
    return torch.where(step.view(rows, channels, 1, 1) > 0, equalised, x)  # a flat channel: unchanged


_RAND_AUGMENT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda x, _: 255 - x,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda x, factor: _blend(_grey(x).expand_as(x), x, factor),
    "Contrast": _contrast,
    "Brightness": lambda x, factor: _blend(torch.zeros_like(x), x, factor),
    "Sharpness": _sharpness,
}


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue rotated by ``shift`` turns (PIL's HSV round trip, in floating point)."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1)[0]
    safe = chroma.clamp(min=1e-8)
    hue = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-8), torch.zeros_like(value))
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return _quantise(value[:, None] * (1 - saturation[:, None] * ramp))


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


def _on_rows(x: Tensor, mask: Tensor, op: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``op`` on the rows where the host tensor ``mask`` is True, with those rows of ``args``."""
    rows = mask.nonzero().flatten()
    if not len(rows):
        return x
    if len(rows) == len(mask):
        return op(x, *(arg.to(x.device, x.dtype, non_blocking=True) for arg in args))
    on_device = rows.to(x.device, non_blocking=True)
    picked = (arg[rows].to(x.device, x.dtype, non_blocking=True) for arg in args)
    return x.index_copy(0, on_device, op(x.index_select(0, on_device), *picked))


def _sample_points(size: int, supersampling: int, maps: Tensor) -> Tensor:
    """``[B, n, n, 2]`` source coordinates of the ``n = size · supersampling`` sample points per side."""
    steps = (torch.arange(size * supersampling, dtype=maps.dtype, device=maps.device) + 0.5) / supersampling
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    points = torch.stack([x, y, torch.ones_like(x)], -1)  # [n, n, 3]
    return torch.einsum("bij,yxj->byxi", maps, points)


def _outside(points: Tensor, sizes: Tensor) -> Tensor:
    """``[B, 1, n, n]``: 1.0 where a point falls outside its image (as PIL's affine transform has it)."""
    limits = sizes.view(-1, 1, 1, 2)
    return ((points < 0) | (points >= limits)).any(-1)[:, None].to(points.dtype)


def render_views(images: Tensor, sizes: Tensor, params: ViewParams, size: int, fill: Sequence[int]) -> Tensor:
    """``[B, 3, size, size]`` float grey levels of one crop position's views of ``images`` (float,
    on the device; ``sizes`` their (width, height) on the device), drawn as ``params`` (on the host)."""
    device, dtype = images.device, images.dtype
    stride = params.source_map[:, :, :2].norm(dim=1).max().item()  # host tensor: no device sync
    supersampling = min(_MAX_SUPERSAMPLING, max(1, math.ceil(stride - 1e-6)))
    maps = params.source_map.to(device, dtype, non_blocking=True)
    points = _sample_points(size, supersampling, maps)
    padded = torch.tensor(images.shape[:1:-1], dtype=dtype, device=device)  # (width, height)
    grid = points * (2 / padded) - 1
    x = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    x = _quantise(F.avg_pool2d(x, supersampling))
    fill_colour = torch.tensor(fill, dtype=dtype, device=device).view(1, 3, 1, 1)
    for layer in range(params.ra_ops.shape[1]):
        active = params.fill_active[:, layer]
        if active.any():
            layer_maps = params.fill_maps[:, layer].to(device, dtype, non_blocking=True)
            uncovered = _outside(_sample_points(size, supersampling, layer_maps), sizes.to(dtype))
            uncovered = F.avg_pool2d(uncovered, supersampling) * _per_row(active.to(device, dtype))
            x = _quantise(torch.lerp(x, fill_colour.expand_as(x), uncovered))
        ops = params.ra_ops[:, layer]
        for index in ops.unique().tolist():
            if index:
                x = _on_rows(
                    x, ops == index, _RAND_AUGMENT[RAND_AUGMENT_OPS[index]], params.ra_args[:, layer]
                )
    return _weak_colour(x, params)


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
        self.fill = rand_augment_fill(mean)
        self.global_size, self.local_size = global_size, local_size

    def __call__(self, batch: DeviceBatch) -> list[Tensor]:
        images = batch.images.to(self.device, non_blocking=True).to(torch.float32)
        sizes = batch.sizes.to(self.device, non_blocking=True)
        crops = [
            render_views(images, sizes, params, self.global_size if i < 4 else self.local_size, self.fill)
            for i, params in enumerate(batch.params)
        ]
        boxes = [params.erase_box for params in batch.params]
        return self.finisher(MultiCropBatch(crops, boxes, batch.erase_noise, batch.weak_flags, batch.labels))
