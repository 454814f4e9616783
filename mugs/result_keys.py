"""What each stage's result depends on: the one table that the workflow's rerun triggers (and with
them the generated ``dvc.yaml``'s params) and a pretraining run's resume check read.

A key names a setting or a whole section (``"model"``: every ``model.*`` key).
"""

from __future__ import annotations

from typing import Any

RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": (
        "data.source",
        "data.root",
        "data.classes",
        "data.max_per_class",
        "data.val_fraction",
        "data.split_seed",
        "data.on_bad_image",
    ),
    "pretrain": (
        "model",
        "loss",
        "augment",
        "optim",
        "data.train_subset",
        "train.seed",
        "train.init_from",
    ),
    "select": (
        "evaluate.network",
        "evaluate.selection_policy",
        "evaluate.selection_k",
        "evaluate.knn_temperature",
    ),
    "knn": (
        "evaluate.network",
        "evaluate.knn_k",
        "evaluate.knn_temperature",
        "evaluate.knn_split",
    ),
    "linear": (
        "evaluate.network",
        "evaluate.linear_n_last_blocks",
        "evaluate.linear_avgpool",
        "evaluate.linear_epochs",
        "evaluate.linear_batch_size",
        "evaluate.linear_lrs",
        "evaluate.linear_weight_decays",
        "evaluate.linear_seed",
        "evaluate.linear_protocol",
        "evaluate.linear_min_lr",
    ),
    "fewshot": (
        "evaluate.network",
        "evaluate.fewshot_fractions",
        "evaluate.fewshot_seed",
        "evaluate.fewshot_c",
        "evaluate.fewshot_max_iter",
    ),
    # every fine-tuning setting but how often its state is saved, and the seed of its data order,
    # augmentations, head, drop path and Mixup/CutMix
    "finetune": (
        "finetune.epochs",
        "finetune.batch_size",
        "finetune.lr",
        "finetune.min_lr",
        "finetune.warmup_epochs",
        "finetune.weight_decay",
        "finetune.layer_decay",
        "finetune.drop_path_rate",
        "finetune.mixup",
        "finetune.cutmix",
        "finetune.label_smoothing",
        "finetune.rand_augment",
        "finetune.erasing_prob",
        "finetune.checkpoint_key",
        "finetune.precision",
        "train.seed",
    ),
    # the baselines: the run's networks at their random initialisation (what build_networks reads,
    # seeded as pretraining starts), evaluated by the knn and linear rules; the raw pixels under kNN
    "random_init": (
        "model",
        "loss.instance_weight",
        "loss.local_group_weight",
        "loss.group_weight",
        "loss.local_group_queue_size",
        "loss.local_group_knn_top_n",
        "loss.memory_pointer",
        "augment.global_size",
        "train.seed",
    ),
    "raw_pixel_knn": (
        "augment.global_size",
        "evaluate.knn_k",
        "evaluate.knn_temperature",
        "evaluate.knn_split",
    ),
}

# where the raw data lie, not what they are: moving them prepares the data again, but a pretraining
# run may resume across the move
DATA_LOCATION = ("data.root",)


def pretraining_keys() -> tuple[str, ...]:
    """What a pretraining run's result depends on: its own settings and those of the data it trains on."""
    prepared = tuple(key for key in RESULT_KEYS["prepare"] if key not in DATA_LOCATION)
    return prepared + RESULT_KEYS["pretrain"]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as ``{"section.key": value}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def depends_on(key: str, keys: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` is one of ``keys`` or lies in a section ``keys`` names."""
    return any(key == entry or key.startswith(f"{entry}.") for entry in keys)
