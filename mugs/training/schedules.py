"""Per-iteration schedules for the learning rate, the weight decay and the teacher momentum."""

from __future__ import annotations

import numpy as np

from mugs.config import OptimConfig


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """One value per iteration (float64, length ``epochs · iters_per_epoch``), as DINO defines it.

    The first ``w = warmup_epochs · iters_per_epoch`` values rise linearly from ``warmup_start`` to
    ``base`` (both ends included); the remaining ``n`` iterations ``i = 0 … n−1`` follow
    ``final + 0.5·(base − final)·(1 + cos(π·i/n))``, which starts at ``base`` and approaches ``final``
    without quite reaching it.
    """
    if epochs < 0 or iters_per_epoch < 0 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(
            f"need 0 <= warmup_epochs <= epochs and iters_per_epoch >= 0, got warmup_epochs={warmup_epochs}, "
            f"epochs={epochs}, iters_per_epoch={iters_per_epoch}"
        )
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters, dtype=np.float64)
    cosine_iters = epochs * iters_per_epoch - warmup_iters
    phase = np.arange(cosine_iters, dtype=np.float64) / max(cosine_iters, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * phase))
    return np.concatenate((warmup, cosine))


def pretraining_schedules(
    optim: OptimConfig, iterations_per_epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learning rate (scaled by the batch size over 256, after a linear warm-up), weight decay and
    teacher momentum (rising to 1), one value per iteration of the run."""
    epochs = optim.epochs
    lr = cosine_schedule(
        optim.lr * optim.batch_size / 256.0,
        optim.min_lr,
        epochs,
        iterations_per_epoch,
        warmup_epochs=optim.warmup_epochs,
    )
    weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, iterations_per_epoch)
    momentum = cosine_schedule(optim.momentum_teacher, 1.0, epochs, iterations_per_epoch)
    return lr, weight_decay, momentum
