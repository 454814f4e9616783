"""The linear probes' cached protocol (``evaluate.linear_protocol: features``) and ``mugs linear``.

The sweep (:mod:`mugs.evaluation.heads`) reads cached centre-crop features, so unlike DINO's recipe
(random-resized crops and flips through the frozen backbone every epoch) it sees no augmentation;
that makes a 100-epoch sweep cost seconds instead of 100 backbone passes, at a small cost in accuracy
on large datasets. ``augmented`` is DINO's recipe (:mod:`mugs.evaluation.augmented_probe`), training
the same :class:`HeadSweep` on features computed from the augmented views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mugs.config import Config
from mugs.evaluation.augmented_probe import augmented_linear_evaluate
from mugs.evaluation.features import FeatureSet, evaluation_features
from mugs.evaluation.heads import HeadSweep, ProbeSweep, SweepSettings, sweep_report
from mugs.evaluation.metrics_io import run_evaluation
from mugs.progress import progress_display

__all__ = ["linear_evaluate", "run_linear", "train_linear_probes"]


def train_linear_probes(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    batch_size: int,
    min_lr: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ProbeSweep:
    """Train one head per ``(lr, weight decay)`` pair on frozen features; keep each head's best-on-val
    weights; pick the head with the best validation top-1. ``lrs`` are for a batch of 256.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    n, dim = train_features.shape
    heads = HeadSweep(
        lrs,
        weight_decays,
        dim,
        num_classes,
        batch_size=batch_size,
        total_steps=epochs * math.ceil(n / batch_size),
        min_lr=min_lr,
        seed=seed,
        device=device,
    )
    generator = torch.Generator().manual_seed(seed)
    train_labels = train_labels.to(device)

    with progress_display(progress) as bar:
        task = bar.add_task(f"linear probes ({len(heads.pairs)} heads)", total=epochs, unit="epochs")
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                heads.train_step(
                    train_features[index].to(device, torch.float32), train_labels[index.to(device)]
                )
            best = heads.end_epoch(epoch, val_features, val_labels, max(batch_size, 1024))
            bar.update(task, advance=1, description=f"linear probes: best val top-1 {best:.4f}")
    return heads.result()


def linear_evaluate(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    sweep: SweepSettings,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sweep on ``train``, select on ``val``, report the selected head's accuracy on ``test``."""
    trained = train_linear_probes(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes=train.num_classes,
        **vars(sweep),
        device=device,
        progress=progress,
    )
    return sweep_report(trained, test, train.coarse_of_class(), sweep)


def run_linear(
    checkpoint: str | Path,
    config: Config,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The linear-probe sweep of ``evaluate.linear_*`` on ``checkpoint``'s frozen backbone, under
    ``evaluate.linear_protocol``: on cached features of train / val / test, or on augmented views of
    train (:mod:`mugs.evaluation.augmented_probe`) with val / test cached. Writes the metrics JSON
    ``out`` and returns its contents without provenance.
    """
    from mugs.distributed import resolve_device

    settings = config.evaluate
    resolved = torch.device(device) if device else resolve_device(settings.device)
    augmented = settings.linear_protocol == "augmented"
    sweep = SweepSettings.of(settings)
    where = {"device": resolved, "progress": progress}
    return run_evaluation(
        config,
        out,
        checkpoint=checkpoint,
        features=lambda: evaluation_features(
            checkpoint,
            config,
            ("val", "test") if augmented else ("train", "val", "test"),
            linear=True,
            device=resolved,
            progress=progress,
        ),
        header={
            "evaluation": "linear",
            "protocol": settings.linear_protocol,
            "network": settings.network,
            "n_last_blocks": settings.linear_n_last_blocks,
            "avgpool": settings.linear_avgpool,
            "coarse": "derived from the fine prediction through the fine-to-coarse class map",
        },
        evaluate=(
            (lambda features: augmented_linear_evaluate(checkpoint, config, *features, sweep, **where))
            if augmented
            else (lambda features: linear_evaluate(*features, sweep, **where))
        ),
        timing_key="train_seconds",
    )
