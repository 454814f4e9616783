"""Mugs multi-crop augmentation: weak (DINO-style) and strong (RandAugment) views, one weak flag per image.

The views leave the loader as uint8 pixels with, for strong views, random erasing's box and noise; the
last steps of every view (to [0, 1], pasting the noise, normalisation) run on the training device for a
whole batch (:class:`CropFinisher`), much as the official code's prefetcher normalises on the GPU. The
result is bit-identical to finishing each crop in the loader, and the loader's shared memory, pinned
buffers and host-to-device copies carry about a quarter of the bytes.

Every random draw comes from Python's ``random`` or torch's global generator (the two that
``torch.utils.data`` seeds per worker), so ``random.seed(s); torch.manual_seed(s)`` before a call makes
its output bit-identical. timm's ``RandAugment`` picks its ops with NumPy's global generator; that one
choice is re-routed through Python's ``random``, and made without replacement as the authors make it,
by :class:`SeededRandAugment`.
"""

import copy
import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN
from torch import Tensor
from torchvision import transforms as T

from mugs.data.windowed import DeferredImage, DeferredOp, WindowedResizedCrop

__all__ = [
    "NO_ERASING",
    "CropFinisher",
    "MultiCropAugmentation",
    "MultiCropBatch",
    "MultiCropViews",
    "RandomErasingPatch",
    "RandomGaussianBlur",
    "SeededRandAugment",
    "collate_multicrop",
    "posterize_or_black",
    "rand_augment_fill",
    "strong_transform",
    "weak_transform",
]

_BICUBIC = T.InterpolationMode.BICUBIC
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_BLUR_SIGMA = (0.1, 2.0)
# The official strong transform scales RandAugment's absolute translations by 0.45 × crop side, as timm does.
_TRANSLATE_FRACTION = 0.45

ErasingBox = tuple[int, int, int, int]  # top, left, height, width
NO_ERASING: ErasingBox = (0, 0, 0, 0)
_NO_NOISE = torch.empty(0)


class RandomGaussianBlur:
    """With probability ``prob``, PIL's Gaussian blur of radius σ ~ U(``sigma``) (METHOD §4).

    PIL's filter, as in the official code: its extended box blur needs no kernel size and costs a
    few passes per pixel, where torchvision's dense 2-D kernel (23 × 23 at 224 px) made the blur of a
    global crop a third of the whole multi-crop augmentation. Both draws come from Python's ``random``.
    """

    def __init__(self, prob: float, sigma: tuple[float, float] = _BLUR_SIGMA) -> None:
        self.prob, self.sigma = prob, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prob={self.prob}, sigma={self.sigma})"


def posterize_or_black(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, but keeping 0 bits gives a black image (old Pillow) instead of raising."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep)


class SeededRandAugment:
    """timm RandAugment (``rand_augment_transform``) whose op choice is driven by Python's ``random``.

    The ops, magnitudes and per-op draws are timm's own. The op choice is by default the authors' (their
    fork, ``src/RandAugment.py``): ``num_layers`` distinct ops, where current timm draws with replacement
    unless weighted (one view in 15 repeats an op); ``timm_choice`` keeps timm's, for timm's recipes.
    It uses NumPy's ``choice`` on a private generator seeded from ``random`` (NumPy's global state is
    neither read nor changed). Posterize
    ops are copies whose function maps 0 kept bits to black; timm's module and op tables are untouched.
    With ``deferred``, the ops that allow it are only recorded (:mod:`mugs.data.windowed`) and the result
    may be a ``DeferredImage``, for a ``WindowedResizedCrop`` to compute over its box.
    """

    def __init__(
        self, config_str: str, hparams: dict, *, deferred: bool = False, timm_choice: bool = False
    ) -> None:
        timm_ra = auto_augment.rand_augment_transform(config_str, dict(hparams))
        self.ops = [self._own_op(op, deferred) for op in timm_ra.ops]
        self.num_layers = timm_ra.num_layers
        self.choice_weights = timm_ra.choice_weights
        self.replace = timm_choice and self.choice_weights is None

    @staticmethod
    def _own_op(op: auto_augment.AugmentOp, deferred: bool) -> auto_augment.AugmentOp:
        op = copy.copy(op)
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize_or_black
        if deferred:
            op.aug_fn = DeferredOp(op.name, op.aug_fn)
        return op

    def __call__(self, img: Image.Image) -> Image.Image | DeferredImage:
        rng = np.random.default_rng(random.getrandbits(64))
        chosen = rng.choice(len(self.ops), self.num_layers, replace=self.replace, p=self.choice_weights)
        for i in chosen:
            img = self.ops[i](img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.num_layers}, ops={self.ops})"


class RandomErasingPatch:
    """With probability ``prob``, the box of a crop that random erasing ('pixel' mode, one box) fills,
    and its N(0, 1) pixels.

    Up to ``attempts`` tries: area a ~ U(``area``) · H · W and aspect r with log r ~ U(log 0.3, log 1/0.3)
    give height round(√(a r)) and width round(√(a / r)); the first box smaller than the crop on both
    sides is placed uniformly, as ``(top, left, height, width)``, with ``[3, height, width]`` standard
    normal noise (in [0, 1] units: normalisation follows); :data:`NO_ERASING` and an empty patch
    otherwise. These are timm's ``RandomErasing`` draws, from Python's and torch's generators in the
    same order, so views and noise are the same; :class:`CropFinisher` pastes the noise on the device.
    """

    def __init__(
        self,
        prob: float,
        area: tuple[float, float] = (0.02, 1.0 / 3.0),
        aspect: tuple[float, float] = (0.3, 1.0 / 0.3),
        attempts: int = 10,
    ) -> None:
        self.prob, self.area, self.attempts = prob, area, attempts
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, crop: Tensor) -> tuple[Tensor, ErasingBox, Tensor]:
        if random.random() <= self.prob:
            height, width = crop.shape[-2:]
            for _ in range(self.attempts):
                area = random.uniform(*self.area) * height * width
                aspect = math.exp(random.uniform(*self.log_aspect))
                box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if box_h < height and box_w < width:
                    top, left = random.randint(0, height - box_h), random.randint(0, width - box_w)
                    noise = torch.empty((crop.shape[0], box_h, box_w)).normal_()
                    return crop, (top, left, box_h, box_w), noise
        return crop, NO_ERASING, _NO_NOISE

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prob={self.prob}, area={self.area})"


def weak_transform(
    size: int, scale: tuple[float, float], *, blur_prob: float, solarize_prob: float = 0.0
) -> T.Compose:
    """DINO-style: bicubic crop, flip, colour jitter p 0.8, grayscale p 0.2, blur, solarize; uint8 pixels.

    Normalisation follows on the device (:class:`CropFinisher`).
    """
    ops = [
        T.RandomResizedCrop(size, scale=scale, ratio=_RATIO, interpolation=_BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomGaussianBlur(blur_prob),
    ]
    if solarize_prob > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_prob))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def rand_augment_fill(mean: Sequence[float]) -> tuple[int, ...]:
    """The colour RandAugment's geometric ops fill uncovered pixels with: ``mean`` in grey levels."""
    return tuple(min(255, round(255 * m)) for m in mean)


def strong_transform(
    size: int,
    scale: tuple[float, float],
    *,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
    erasing_prob: float = 0.25,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
) -> T.Compose:
    """Strong view: flip, RandAugment on the full image, bicubic crop; uint8 pixels, erasing box and noise.

    RandAugment's ops are computed only as far as the crop looks (:mod:`mugs.data.windowed`): the same
    draws and the same pixels as running them on the whole image, at a fraction of the cost.

    RandAugment fills what its geometric ops uncover with ``mean``. Erasing comes before normalisation as
    in the official default (``use_prefetcher``: the loader yields [0, 1] tensors, erased with N(0, 1)
    pixels, and the prefetcher normalises them on the GPU); both happen in :class:`CropFinisher`.
    """
    hparams = {"translate_const": int(size * _TRANSLATE_FRACTION), "img_mean": rand_augment_fill(mean)}
    return T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            SeededRandAugment(rand_augment, hparams, deferred=True),
            WindowedResizedCrop(size, scale=scale, ratio=_RATIO, interpolation=_BICUBIC),
            T.PILToTensor(),
            RandomErasingPatch(erasing_prob),
        ]
    )


class MultiCropViews(NamedTuple):
    """One image's views: uint8 crops, the erasing box and noise of each, and the weak flag."""

    crops: list[Tensor]
    erase_boxes: list[ErasingBox]
    erase_noise: list[Tensor]
    weak: bool


class MultiCropAugmentation:
    """Mugs multi-crop: ``4 + n_local`` crops and the image's weak flag, as :class:`MultiCropViews`.

    Crop order: teacher global 1 (weak 1), teacher global 2 (weak 2), student global 1, student global 2,
    then ``n_local`` local crops. With probability ``weak_prob`` the student globals are fresh draws of
    weak 1 and weak 2 and the flag is True; otherwise both are strong and the flag is False. Each local
    crop is independently weak with probability ``weak_prob`` and strong otherwise.
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        weak_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        rand_augment: str = "rand-m9-mstd0.5-inc1",
        erasing_prob: float = 0.25,
    ) -> None:
        if not 0.0 <= weak_prob <= 1.0:
            raise ValueError(f"weak_prob must lie in [0, 1], got {weak_prob}")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.n_local = n_local
        self.weak_prob = weak_prob
        strong = {"rand_augment": rand_augment, "erasing_prob": erasing_prob, "mean": tuple(mean)}
        self.weak_global1 = weak_transform(global_size, global_scale, blur_prob=1.0)
        self.weak_global2 = weak_transform(global_size, global_scale, blur_prob=0.1, solarize_prob=0.2)
        self.strong_global = strong_transform(global_size, global_scale, **strong)
        self.weak_local = weak_transform(local_size, local_scale, blur_prob=0.5)
        self.strong_local = strong_transform(local_size, local_scale, **strong)

    def draw_views(self, image: Image.Image) -> tuple[list, bool]:
        """Each crop position's view transform applied to the RGB ``image``, in order; the weak flag."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        views = [self.weak_global1(image), self.weak_global2(image)]
        weak = random.random() < self.weak_prob
        if weak:
            views += [self.weak_global1(image), self.weak_global2(image)]
        else:
            views += [self.strong_global(image), self.strong_global(image)]
        for _ in range(self.n_local):
            local = self.weak_local if random.random() < self.weak_prob else self.strong_local
            views.append(local(image))
        return views, weak

    def __call__(self, image: Image.Image) -> MultiCropViews:
        views, weak = self.draw_views(image)
        erasable = [view if isinstance(view, tuple) else (view, NO_ERASING, _NO_NOISE) for view in views]
        crops, boxes, noise = (list(column) for column in zip(*erasable, strict=True))
        return MultiCropViews(crops, boxes, noise, weak)


class MultiCropBatch(NamedTuple):
    """Per crop position: ``[B, 3, H, W]`` uint8 crops, ``[B, 4]`` erasing boxes and the erasing noise
    of its rows, flattened and joined in row order; then the weak flags and labels.
    """

    crops: list[Tensor]
    erase_boxes: list[Tensor]
    erase_noise: list[Tensor]
    weak_flags: Tensor
    labels: Tensor


def collate_multicrop(batch: list[tuple[MultiCropViews, int]]) -> MultiCropBatch:
    """Stack ``(views, label)`` items position by position into a :class:`MultiCropBatch`."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    n_crops = len(batch[0][0].crops)
    if any(len(views.crops) != n_crops for views, _ in batch):
        raise ValueError("all items of a batch must have the same number of crops")
    positions = range(n_crops)
    return MultiCropBatch(
        crops=[torch.stack([views.crops[i] for views, _ in batch]) for i in positions],
        erase_boxes=[torch.tensor([views.erase_boxes[i] for views, _ in batch]) for i in positions],
        erase_noise=[torch.cat([views.erase_noise[i].flatten() for views, _ in batch]) for i in positions],
        weak_flags=torch.tensor([bool(views.weak) for views, _ in batch], dtype=torch.bool),
        labels=torch.tensor([int(label) for _, label in batch], dtype=torch.int64),
    )


class CropFinisher:
    """The last steps of every view, for a whole batch on the training device.

    x = (e(u / 255) − mean) / std, where u are the uint8 pixels and e pastes each crop's erasing noise
    (N(0, 1), in [0, 1] units, as the official prefetcher has it) into its box. The same operations as
    ``ToTensor``, timm's ``RandomErasing`` and ``Normalize`` on each crop, so the result is bit-identical
    to theirs on CPU. Nothing is read back from the device: whether a position has noise is host data.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1).to(self.device)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1).to(self.device)

    def __call__(self, batch: MultiCropBatch) -> list[Tensor]:
        finished = []
        for crops, boxes, noise in zip(batch.crops, batch.erase_boxes, batch.erase_noise, strict=True):
            x = crops.to(self.device, non_blocking=True).to(torch.float32).div_(255)
            if noise.numel():
                inside = _box_mask(boxes.to(self.device, non_blocking=True), *x.shape[-2:]).expand_as(x)
                # the noise is in the mask's row-major order; indices from its prefix sum (rather than
                # a boolean-mask scatter) keep the paste free of host synchronisation
                source = inside.flatten().cumsum(0).sub_(1).clamp_(min=0).view_as(x)
                noise = noise.to(self.device, non_blocking=True)
                x = torch.where(inside, noise[source], x)
            finished.append(x.sub_(self.mean).div_(self.std))
        return finished


def _box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``[B, 1, H, W]``: True inside each row's ``(top, left, height, width)`` box."""
    top, left, box_h, box_w = boxes.unbind(1)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
