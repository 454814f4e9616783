"""A tiny prepared image-folder split and a pretrained checkpoint for fine-tuning tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mugs.config import Config, DataConfig
from mugs.data.prepare import run_prepare
from mugs.model.backbone import create_backbone
from mugs.training.checkpoint import FORMAT, atomic_save


def prepare_tiny_split(directory: Path, counts: tuple[int, int, int] = (4, 2, 3), side: int = 8) -> Path:
    """4 classes in 2 coarse groups of ``side``-pixel noise images around a per-class grey level;
    ``counts`` images per class in train, val and test. Returns the prepared directory."""
    rng = np.random.default_rng(0)
    root = directory / "data"
    names = ["a", "b", "c", "d"]
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(60 * c + rng.integers(0, 30, (side, side)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / name / f"{i}.png")
    (root / "coarse.json").write_text(json.dumps({"a": "x", "b": "x", "c": "y", "d": "y"}))
    out = directory / "prepared"
    run_prepare(
        DataConfig(source="imagefolder", root=str(root), prepared_dir=str(out), workers=1), progress=False
    )
    return out


def pretrained_checkpoint(path: Path, config: Config) -> Path:
    """A checkpoint holding a randomly initialised teacher backbone of ``config``'s model, and the config."""
    model = config.model
    backbone = create_backbone(
        model.arch,
        patch_size=model.patch_size,
        img_size=config.augment.global_size,
        relation_block=True,
        depth=model.depth,
    )
    return atomic_save(
        {
            "format": FORMAT,
            "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "config": config.to_dict(),
        },
        path,
    )
