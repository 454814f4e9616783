"""Mugs multi-crop augmentation: weak (DINO-style) and strong (RandAugment) views, one weak flag per image.

Every random draw comes from Python's ``random`` or torch's global generator (the two that
``torch.utils.data`` seeds per worker), so ``random.seed(s); torch.manual_seed(s)`` before a call makes
its output bit-identical. timm's ``RandAugment`` picks its ops with NumPy's global generator; that one
choice is re-routed through Python's ``random`` by :class:`SeededRandAugment`.
"""

import copy
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torchvision import transforms as T

__all__ = [
    "MultiCropAugmentation",
    "RandomGaussianBlur",
    "SeededRandAugment",
    "collate_multicrop",
    "posterize_or_black",
    "strong_transform",
    "weak_transform",
]

_BICUBIC = T.InterpolationMode.BICUBIC
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_BLUR_SIGMA = (0.1, 2.0)
# The official strong transform scales RandAugment's absolute translations by 0.45 × crop side, as timm does.
_TRANSLATE_FRACTION = 0.45


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

    The ops, magnitudes and per-op draws are timm's own; the op choice uses NumPy's ``choice`` semantics on
    a private generator seeded from ``random`` (NumPy's global state is neither read nor changed). Posterize
    ops are copies whose function maps 0 kept bits to black; timm's module and op tables are untouched.
    """

    def __init__(self, config_str: str, hparams: dict) -> None:
        timm_ra = auto_augment.rand_augment_transform(config_str, dict(hparams))
        self.ops = [self._safe_op(op) for op in timm_ra.ops]
        self.num_layers = timm_ra.num_layers
        self.choice_weights = timm_ra.choice_weights

    @staticmethod
    def _safe_op(op: auto_augment.AugmentOp) -> auto_augment.AugmentOp:
        if op.aug_fn is not auto_augment.posterize:
            return op
        op = copy.copy(op)
        op.aug_fn = posterize_or_black
        return op

    def __call__(self, img: Image.Image) -> Image.Image:
        rng = np.random.default_rng(random.getrandbits(64))
        # timm samples with replacement unless weighted
        chosen = rng.choice(
            len(self.ops), self.num_layers, replace=self.choice_weights is None, p=self.choice_weights
        )
        for i in chosen:
            img = self.ops[i](img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.num_layers}, ops={self.ops})"


def weak_transform(
    size: int,
    scale: tuple[float, float],
    *,
    blur_prob: float,
    solarize_prob: float = 0.0,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> T.Compose:
    """DINO-style: bicubic crop, flip, colour jitter p 0.8, grayscale p 0.2, blur, solarize, normalise."""
    ops = [
        T.RandomResizedCrop(size, scale=scale, ratio=_RATIO, interpolation=_BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        RandomGaussianBlur(blur_prob),
    ]
    if solarize_prob > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_prob))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def strong_transform(
    size: int,
    scale: tuple[float, float],
    *,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
    erasing_prob: float = 0.25,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> T.Compose:
    """Strong view: flip, RandAugment on the full image, bicubic crop, to tensor, random erasing, normalise.

    Erasing comes before normalisation as in the official default (``use_prefetcher``: the loader yields
    [0, 1] tensors, erased with N(0, 1) pixels, and the prefetcher normalises them on the GPU).
    """
    hparams = {
        "translate_const": int(size * _TRANSLATE_FRACTION),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    ops = [
        T.RandomHorizontalFlip(p=0.5),
        SeededRandAugment(rand_augment, hparams),
        T.RandomResizedCrop(size, scale=scale, ratio=_RATIO, interpolation=_BICUBIC),
        T.ToTensor(),
    ]
    if erasing_prob > 0:
        ops.append(RandomErasing(erasing_prob, mode="pixel", max_count=1, num_splits=0, device="cpu"))
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


class MultiCropAugmentation:
    """Mugs multi-crop: ``4 + n_local`` crops and the image's weak flag.

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
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        rand_augment: str = "rand-m9-mstd0.5-inc1",
        erasing_prob: float = 0.25,
    ) -> None:
        if not 0.0 <= weak_prob <= 1.0:
            raise ValueError(f"weak_prob must lie in [0, 1], got {weak_prob}")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.n_local = n_local
        self.weak_prob = weak_prob
        norm = {"mean": tuple(mean), "std": tuple(std)}
        strong = {"rand_augment": rand_augment, "erasing_prob": erasing_prob, **norm}
        self.weak_global1 = weak_transform(global_size, global_scale, blur_prob=1.0, **norm)
        self.weak_global2 = weak_transform(
            global_size, global_scale, blur_prob=0.1, solarize_prob=0.2, **norm
        )
        self.strong_global = strong_transform(global_size, global_scale, **strong)
        self.weak_local = weak_transform(local_size, local_scale, blur_prob=0.5, **norm)
        self.strong_local = strong_transform(local_size, local_scale, **strong)

    def __call__(self, image: Image.Image) -> tuple[list[Tensor], bool]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        crops = [self.weak_global1(image), self.weak_global2(image)]
        weak = random.random() < self.weak_prob
        if weak:
            crops += [self.weak_global1(image), self.weak_global2(image)]
        else:
            crops += [self.strong_global(image), self.strong_global(image)]
        for _ in range(self.n_local):
            local = self.weak_local if random.random() < self.weak_prob else self.strong_local
            crops.append(local(image))
        return crops, weak


def collate_multicrop(
    batch: list[tuple[tuple[list[Tensor], bool], int]],
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Stack ``((crops, weak_flag), label)`` items into per-position ``[B, 3, H, W]`` crops, flags, labels."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    n_crops = len(batch[0][0][0])
    if any(len(crops) != n_crops for (crops, _), _ in batch):
        raise ValueError("all items of a batch must have the same number of crops")
    crops = [torch.stack([item[0][0][i] for item in batch]) for i in range(n_crops)]
    weak_flags = torch.tensor([bool(flag) for (_, flag), _ in batch], dtype=torch.bool)
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    return crops, weak_flags, labels
