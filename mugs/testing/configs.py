"""The tiny pretraining configuration the engine and launcher tests share: a vit_tiny on 16 px
globals and 8 px locals, batch 8, small heads and queues; one iteration takes a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mugs.config import Config, config_from_dict, merge_values


def tiny_training_config(
    output_dir: str | Path, update: dict[str, Any] | None = None, *overrides: str
) -> Config:
    """The tiny configuration writing to ``output_dir``, with ``update`` merged in and ``overrides``
    (``section.key=value``) applied last."""
    values = {
        "preset": "demo",
        "model": {
            "patch_size": 4,
            "hidden_dim": 64,
            "out_dim": 32,
            "predictor_hidden_dim": 64,
            "group_out_dim": 64,
        },
        "loss": {"instance_queue_size": 40, "local_group_queue_size": 40, "local_group_knn_top_n": 4},
        "augment": {"global_size": 16, "local_size": 8, "n_local": 2},
        "optim": {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "lr": 5e-3},
        "train": {
            "output_dir": str(output_dir),
            "num_workers": 0,
            "log_every": 1,
            "checkpoint_every": 0,
            "keep_every_epochs": 1,
            "threads": 1,
        },
    }
    return config_from_dict(merge_values(values, update or {}), list(overrides))
