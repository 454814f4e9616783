"""Small deterministic image datasets for tests and benchmarks (picklable, so spawned ranks get them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """``size`` random RGB images of ``side``×``side`` pixels with labels ``i % classes``, from ``seed``."""

    def __init__(self, size: int = 64, side: int = 28, classes: int = 10, seed: int = 0) -> None:
        self.pixels = np.random.default_rng(seed).integers(0, 256, (size, side, side, 3), dtype=np.uint8)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.pixels[index]), index % self.classes


def write_imagefolder(
    root: Path, sizes: dict[str, int], *, classes: int = 2, side: int = 28, seed: int = 0
) -> Path:
    """An ``imagefolder`` dataset of random PNGs under ``root``: ``sizes[split]`` images per split, labels
    ``i % classes``, in ``root/<split>/c<label>/<i>.png``."""
    for offset, (split, size) in enumerate(sizes.items()):
        images = SyntheticImages(size, side, classes, seed + offset)
        for index in range(size):
            image, label = images[index]
            directory = root / split / f"c{label}"
            directory.mkdir(parents=True, exist_ok=True)
            image.save(directory / f"{index:05d}.png")
    return root
