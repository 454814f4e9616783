"""Baselines that say what pretraining added: the same network at its random initialisation, and raw
pixels.

The random-init checkpoint is built by :func:`mugs.model.initial_networks` (seeded with
``train.seed``), exactly as a pretraining run starts, and saved in the checkpoint format; ``mugs knn``
and ``mugs linear`` then evaluate it through the same code path as a trained checkpoint.

Raw pixels are the evaluation view's geometry (resize the shorter side to ``round(g · 256/224)``,
centre-crop ``g = augment.global_size``), in grey level in [0, 1] and flattened, classified by the
same weighted kNN vote (cosine, ``exp(s / T)``, every ``evaluate.knn_k``) on the same splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mugs.config import Config
from mugs.evaluation.features import FeatureSet, eval_geometry
from mugs.evaluation.knn import knn_evaluate
from mugs.evaluation.metrics_io import run_evaluation
from mugs.progress import progress_display

__all__ = ["pixel_features", "random_init_checkpoint", "run_raw_pixel_knn"]


def random_init_checkpoint(config: Config, out: str | Path) -> Path:
    """Write the student and teacher of ``config`` as pretraining initialises them (seeded by
    ``train.seed``), with the config, to the checkpoint ``out``."""
    from mugs.model import initial_networks
    from mugs.training import checkpoint as ckpt

    student, teacher = initial_networks(config)
    # no losses: their queues and centre are not part of a backbone's evaluation
    payload = ckpt.training_payload(
        student=student, teacher=teacher, losses={}, config=config, epoch=0, global_iteration=0
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return ckpt.atomic_save(payload, out)


def pixel_transform(global_size: int) -> T.Compose:
    """The evaluation view's resize and centre crop, in grey level, as a ``[g·g]`` vector in [0, 1]."""
    return T.Compose(
        [
            *eval_geometry(global_size),
            T.Grayscale(),
            T.ToTensor(),
            torch.flatten,
        ]
    )


def pixel_features(
    prepared: str | Path,
    split: str,
    global_size: int,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> FeatureSet:
    """The raw-pixel rows of ``split`` (see :func:`pixel_transform`) with its labels, in split order,
    decoded and transformed by ``num_workers`` loader processes (in this process when 0)."""
    from mugs.data.datasets import open_split

    dataset = open_split(prepared, split, pixel_transform(global_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pixels = torch.empty(len(dataset), global_size * global_size)
    with progress_display(progress) as bar:
        task = bar.add_task(f"raw pixels {split}", total=len(dataset), unit="images")
        start = 0
        for rows, _labels in loader:
            pixels[start : start + len(rows)] = rows
            start += len(rows)
            bar.update(task, completed=start)
    return FeatureSet(
        pixels,
        torch.as_tensor(dataset.labels),
        None if dataset.coarse_labels is None else torch.as_tensor(dataset.coarse_labels),
        list(dataset.classes),
        None if dataset.coarse_classes is None else list(dataset.coarse_classes),
    )


def run_raw_pixel_knn(
    config: Config, out: str | Path, *, split: str | None = None, progress: bool = False
) -> dict[str, Any]:
    """kNN of ``split`` (default ``evaluate.knn_split``) against the train split's raw pixels for every
    ``evaluate.knn_k``; writes the metrics JSON ``out`` and returns its contents without provenance."""
    settings = config.evaluate
    split = split or settings.knn_split
    return run_evaluation(
        config,
        out,
        checkpoint=None,
        features=lambda: [
            pixel_features(
                config.data.prepared_dir,
                name,
                config.augment.global_size,
                batch_size=settings.batch_size,
                num_workers=settings.num_workers,
                progress=progress,
            )
            for name in ("train", split)
        ],
        header={
            "evaluation": "knn",
            "split": split,
            "features": f"raw pixels: grey level of the {config.augment.global_size}-px centre crop",
        },
        evaluate=lambda features: knn_evaluate(
            *features,
            ks=settings.knn_k,
            temperature=settings.knn_temperature,
            chunk_size=settings.knn_chunk_size,
            bank_chunk_size=settings.knn_bank_chunk_size,
        ),
        timing_key="knn_seconds",
    )
