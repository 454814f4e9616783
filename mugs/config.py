"""One typed configuration for everything the package computes, loaded from YAML.

Every hyper-parameter of the method lives here with the published ViT-S/16 100-epoch value as its
default (``sail-sg/mugs`` ``pretraining.sh``).  Unknown keys and wrongly typed values are errors that
name the key, so a typo in ``params.yaml`` fails before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range; the message names it."""


@dataclass
class ModelConfig:
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = "vit_small"
    depth: int | None = None  # blocks; None = the size's own (12, or 24 for vit_large)
    patch_size: int = 16
    drop_path_rate: float = 0.1
    use_bn_in_head: bool = False
    norm_before_pred: bool = True
    norm_last_layer: bool = False
    hidden_dim: int = 2048
    out_dim: int = 256
    predictor_hidden_dim: int = 4096
    group_out_dim: int = 65536


@dataclass
class LossConfig:
    instance_weight: float = 1.0
    local_group_weight: float = 1.0
    group_weight: float = 1.0
    instance_queue_size: int = 65536
    instance_temp: float = 0.2
    local_group_queue_size: int = 65536
    local_group_temp: float = 0.2
    local_group_knn_top_n: int = 8
    # "official" reproduces the public code's 2n pointer stride (half the memory never written)
    memory_pointer: Literal["fixed", "official"] = "fixed"
    group_student_temp: float = 0.1
    group_warmup_teacher_temp: float = 0.04
    group_teacher_temp: float = 0.04
    group_warmup_teacher_temp_epochs: int = 0


@dataclass
class AugmentConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    weak_prob: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    erasing_prob: float = 0.25
    # where the views are computed: by the loader processes (the reference) or, from the parameters they
    # draw, on the training device for the whole batch (mugs.data.device_augment)
    backend: Literal["cpu", "device"] = "cpu"


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 1024  # global, over all ranks
    lr: float = 8e-4  # for a batch of 256, scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # per tensor; 0 disables
    # the public code divides the clip by 10 for vit_large after epoch 100
    clip_grad_late_epoch: int | None = None
    clip_grad_late_factor: float = 0.1
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass
class DataConfig:
    source: Literal["fashion-mnist", "imagefolder"] = "fashion-mnist"
    root: str = "data/fashion-mnist"  # the raw dataset directory (tracked by data.dvc)
    prepared_dir: str = "results/data"  # manifests and statistics written by `mugs prepare`
    val_fraction: float = 0.1  # held out of train when the source has no validation split
    split_seed: int = 0
    on_bad_image: Literal["skip", "error"] = "skip"
    classes: list[str] | None = None
    max_per_class: int | None = None
    workers: int = 2  # processes for scanning and decoding
    # a training subset for quick runs (first N images of a seeded permutation); None = all
    train_subset: int | None = None


@dataclass
class TrainConfig:
    output_dir: str = "results/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # data-loader processes per rank; "auto": on a GPU, the cores this rank may use less one for itself
    # (the multi-crop augmentation, not the GPU, bounds a step on 16 cores: see docs/benchmarks.md); on
    # the CPU, 0 (loader processes would fight the training's threads)
    num_workers: int | Literal["auto"] = "auto"
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    log_every: int = 50  # iterations between JSON log lines
    checkpoint_every: int = 500  # iterations between refreshes of the latest checkpoint; 0 = epoch ends only
    keep_every_epochs: int = 10  # keep a copy every N epochs (and the last); 0 keeps none
    max_iterations: int | None = None  # stop (with a checkpoint) after this global iteration
    compile: bool = False
    stop_on_collapse: bool = False
    # a checkpoint to start a new run from (e.g. one made by `mugs import-official`)
    init_from: str | None = None


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (METHOD §8), BEiT / iBOT recipe; lr is for a batch of 256, scaled linearly."""

    epochs: int = 100
    batch_size: int = 1024  # global, over all ranks
    lr: float = 1.2e-3
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    layer_decay: float = 0.55  # 0.75 for vit_large
    drop_path_rate: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    erasing_prob: float = 0.25
    checkpoint_key: Literal["teacher", "student"] = "teacher"
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class EvalConfig:
    """Frozen-feature evaluations (METHOD §8) and checkpoint selection; linear lrs are for a batch of 256."""

    network: Literal["teacher", "student"] = "teacher"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 256  # images per forward pass while extracting features
    num_workers: int = 4
    cache_dir: str = "results/features"  # extracted features, keyed by checkpoint hash and transform
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    knn_split: Literal["val", "test"] = "test"  # what `mugs knn` reports; selection always scores val
    knn_chunk_size: int = 1024  # queries per similarity block
    knn_bank_chunk_size: int = 262144  # bank rows per similarity block (bounds memory on big banks)
    linear_n_last_blocks: int = 4  # CLS tokens of the last n blocks (4 for ViT-S, 1 + avgpool for B)
    linear_avgpool: bool = False  # append the mean patch token of the last block
    linear_epochs: int = 100
    linear_batch_size: int = 1024
    linear_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    linear_weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    linear_seed: int = 0
    fewshot_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    fewshot_seed: int = 0
    fewshot_c: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # chosen on val
    fewshot_max_iter: int = 1000
    selection_policy: Literal["best_knn", "last"] = "best_knn"
    selection_k: int = 20


@dataclass
class LaunchConfig:
    """Where pretraining runs: here (``local``, ``nprocs`` processes) or as one SLURM job through submitit.

    The SLURM job has ``nodes * tasks_per_node`` ranks (one per GPU on GPU nodes). Time limits and
    preemption are survived by checkpointing on SLURM's signal (``signal_delay_s`` before the limit) and
    requeueing, at most ``max_num_timeout`` times for time limits. ``container`` runs the job's Python in
    that image on every node, through ``container_runtime``: an Apptainer image (a .sif file or a URI) or
    the name of a podman image; ``container_options`` go to the runtime before the image.
    """

    launcher: Literal["local", "slurm"] = "local"
    nprocs: int = 1  # local processes
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: the partition's default
    mem_gb: float | None = None  # per node; None: the partition's default
    timeout_min: int = 1440
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: dict[str, str | int | bool] = field(default_factory=dict)  # {"exclusive": true, ...}
    max_num_timeout: int = 20
    signal_delay_s: int = 120  # must cover one iteration and a checkpoint write
    container: str | None = None
    container_bind: list[str] = field(default_factory=list)  # "SRC[:DEST[:OPTS]]" binds
    container_runtime: Literal["apptainer", "podman"] = "apptainer"
    container_options: list[str] = field(default_factory=list)  # e.g. podman's ["--runtime", "runc"]
    poll_seconds: float = 10.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for tuples) that YAML, JSON and ``torch.load(weights_only=True)`` accept."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """SHA-256 of the resolved configuration, stable across key order."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# Published settings (sail-sg/mugs pretraining.sh) and small ones that run on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_small_100ep": {},
    "vit_small_300ep": {
        "optim": {"epochs": 300, "batch_size": 1024, "weight_decay_end": 0.1},
        "loss": {"group_teacher_temp": 0.07, "group_warmup_teacher_temp_epochs": 30},
    },
    "vit_small_800ep": {
        "optim": {"epochs": 800, "batch_size": 1024, "weight_decay_end": 0.1},
        "loss": {"group_teacher_temp": 0.07, "group_warmup_teacher_temp_epochs": 30},
    },
    "vit_base_400ep": {
        "model": {"arch": "vit_base"},
        "optim": {
            "epochs": 400,
            "batch_size": 1008,
            "min_lr": 2e-6,
            "weight_decay_end": 0.1,
            "freeze_last_layer": 3,
        },
        "loss": {"group_teacher_temp": 0.07, "group_warmup_teacher_temp_epochs": 50},
    },
    "vit_large_250ep": {
        "model": {"arch": "vit_large", "drop_path_rate": 0.3, "norm_last_layer": True},
        "optim": {
            "epochs": 250,
            "batch_size": 640,
            "lr": 1.5e-3,
            "min_lr": 1.5e-4,
            "weight_decay": 0.025,
            "weight_decay_end": 0.08,
            "freeze_last_layer": 3,
            "clip_grad_late_epoch": 100,
        },
        "loss": {"group_teacher_temp": 0.07, "group_warmup_teacher_temp_epochs": 50},
    },
    # Fashion-MNIST on CPU: 28 px images, 32 px globals and 16 px locals with 4 px patches.
    "demo": {
        "model": {
            "arch": "vit_tiny",
            "depth": 6,
            "patch_size": 7,
            "drop_path_rate": 0.0,
            "hidden_dim": 512,
            "out_dim": 128,
            "predictor_hidden_dim": 512,
            "group_out_dim": 1024,
        },
        # 600 iterations of 32 (twice the updates of 64, each image 4 % dearer), a teacher that follows
        # the student within ~20 of them, queues of a few dozen iterations' keys, a sharper instance
        # contrast and no frozen last layer learn fastest (the search in docs/results.md)
        "loss": {"instance_queue_size": 1024, "local_group_queue_size": 1024, "instance_temp": 0.1},
        "augment": {"global_size": 28, "local_size": 14, "n_local": 2},
        "optim": {
            "epochs": 3,
            "batch_size": 32,
            "lr": 1e-3,
            "warmup_epochs": 1,
            "momentum_teacher": 0.95,
            "patch_embed_lr_mult": 1.0,
            "freeze_last_layer": 0,
        },
        "data": {"train_subset": 6400},
        # on 2 cores, augmenting in the training process beats a loader process fighting for the cores;
        # one kept checkpoint (the last) halves the selection's feature extraction
        "train": {"num_workers": 0, "log_every": 10, "checkpoint_every": 50, "keep_every_epochs": 3},
        # cached features make probe epochs cheap; on these features the best lr lies above ImageNet's;
        # the probe on the last block's CLS token reads the features kNN extracted instead of its own
        "evaluate": {
            "linear_n_last_blocks": 1,
            "num_workers": 2,
            "linear_epochs": 30,
            "linear_batch_size": 256,
            "linear_lrs": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
        },
        "finetune": {"epochs": 2, "batch_size": 128, "lr": 5e-4, "warmup_epochs": 1},
    },
}


def _is_instance(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_is_instance(value, arm) for arm in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is tuple:
        arms = typing.get_args(annotation)
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(arms)
            and all(_is_instance(v, a) for v, a in zip(value, arms, strict=True))
        )
    if origin is list:
        (arm,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_is_instance(v, arm) for v in value)
    if origin is dict:
        key_arm, value_arm = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            _is_instance(k, key_arm) and _is_instance(v, value_arm) for k, v in value.items()
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_float_text(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _is_float_text(value: Any) -> bool:
    # YAML 1.1 reads "1e-3" (no dot) as a string; accept it where a float is expected
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn YAML lists into tuples, and ints or numeric strings into floats, where the annotation asks."""
    origin = typing.get_origin(annotation)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, a) for v, a in zip(value, typing.get_args(annotation), strict=True))
    if origin is list and isinstance(value, list):
        (arm,) = typing.get_args(annotation)
        return [_coerce(v, arm) for v in value]
    if annotation is float and isinstance(value, (int, str)):
        return float(value)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(annotation):
            if _is_instance(value, arm):
                return _coerce(value, arm)
    return value


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key '{where}{unknown[0]}'"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}{name}"
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key + ".")
        elif not _is_instance(value, annotation):
            raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
        else:
            kwargs[name] = _coerce(value, annotation)
    return cls(**kwargs)


def merge_values(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``update`` (nested mappings merged, anything else replaced)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is, in one line (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(error, 'problem', None) or type(error).__name__}"


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-3"`` → ``{"optim": {"lr": 0.001}}`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--set {key.strip()}: the value {raw!r} is not valid YAML{_yaml_problem(error)}"
        ) from None
    nested: dict[str, Any] = {}
    cursor = nested
    *parents, leaf = parts
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = value
    return nested


class ConfigWarning(UserWarning):
    """A configuration that runs but is probably not what was meant; the message names the keys."""


@dataclass(frozen=True)
class Range:
    """The finite values from ``low`` to ``high`` (either may be ``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_included: bool = True
    high_included: bool = True

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value >= self.low if self.low_included else value > self.low)
        below = self.high is None or (value <= self.high if self.high_included else value < self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_included else '>'} {self.low:g}"
        left, right = "[" if self.low_included else "(", "]" if self.high_included else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_included=False)
PROBABILITY, BELOW_1 = Range(0, 1), Range(0, 1, high_included=False)
FRACTION = Range(0, 1, low_included=False)

# The allowed values of every numeric key (each element of a list or pair); None ("not set") and
# "auto" are left to the type check. tests/test_config.py checks that no numeric key is missing.
RANGES: dict[str, Range] = {
    "model.depth": AT_LEAST_1,
    "model.patch_size": AT_LEAST_1,
    "model.drop_path_rate": BELOW_1,
    "model.hidden_dim": AT_LEAST_1,
    "model.out_dim": AT_LEAST_1,
    "model.predictor_hidden_dim": AT_LEAST_1,
    "model.group_out_dim": AT_LEAST_1,
    "loss.instance_weight": AT_LEAST_0,
    "loss.local_group_weight": AT_LEAST_0,
    "loss.group_weight": AT_LEAST_0,
    "loss.instance_queue_size": AT_LEAST_1,
    "loss.instance_temp": POSITIVE,
    "loss.local_group_queue_size": AT_LEAST_1,
    "loss.local_group_temp": POSITIVE,
    "loss.local_group_knn_top_n": AT_LEAST_1,
    "loss.group_student_temp": POSITIVE,
    "loss.group_warmup_teacher_temp": POSITIVE,
    "loss.group_teacher_temp": POSITIVE,
    "loss.group_warmup_teacher_temp_epochs": AT_LEAST_0,
    "augment.global_size": AT_LEAST_1,
    "augment.local_size": AT_LEAST_1,
    "augment.n_local": AT_LEAST_0,
    "augment.global_scale": FRACTION,
    "augment.local_scale": FRACTION,
    "augment.weak_prob": PROBABILITY,
    "augment.erasing_prob": PROBABILITY,
    "optim.epochs": AT_LEAST_1,
    "optim.batch_size": AT_LEAST_1,
    "optim.lr": AT_LEAST_0,
    "optim.min_lr": AT_LEAST_0,
    "optim.warmup_epochs": AT_LEAST_0,
    "optim.weight_decay": AT_LEAST_0,
    "optim.weight_decay_end": AT_LEAST_0,
    "optim.momentum_teacher": PROBABILITY,
    "optim.clip_grad": AT_LEAST_0,
    "optim.clip_grad_late_epoch": AT_LEAST_0,
    "optim.clip_grad_late_factor": AT_LEAST_0,
    "optim.patch_embed_lr_mult": AT_LEAST_0,
    "optim.freeze_last_layer": AT_LEAST_0,
    "data.val_fraction": BELOW_1,
    "data.split_seed": AT_LEAST_0,
    "data.max_per_class": AT_LEAST_1,
    "data.workers": AT_LEAST_0,
    "data.train_subset": AT_LEAST_1,
    "train.seed": AT_LEAST_0,
    "train.num_workers": AT_LEAST_0,
    "train.threads": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.checkpoint_every": AT_LEAST_0,
    "train.keep_every_epochs": AT_LEAST_0,
    "train.max_iterations": AT_LEAST_1,
    "evaluate.batch_size": AT_LEAST_1,
    "evaluate.num_workers": AT_LEAST_0,
    "evaluate.knn_k": AT_LEAST_1,
    "evaluate.knn_temperature": POSITIVE,
    "evaluate.knn_chunk_size": AT_LEAST_1,
    "evaluate.knn_bank_chunk_size": AT_LEAST_1,
    "evaluate.linear_n_last_blocks": AT_LEAST_1,
    "evaluate.linear_epochs": AT_LEAST_1,
    "evaluate.linear_batch_size": AT_LEAST_1,
    "evaluate.linear_lrs": AT_LEAST_0,
    "evaluate.linear_weight_decays": AT_LEAST_0,
    "evaluate.linear_seed": AT_LEAST_0,
    "evaluate.fewshot_fractions": FRACTION,
    "evaluate.fewshot_seed": AT_LEAST_0,
    "evaluate.fewshot_c": POSITIVE,
    "evaluate.fewshot_max_iter": AT_LEAST_1,
    "evaluate.selection_k": AT_LEAST_1,
    "finetune.epochs": AT_LEAST_1,
    "finetune.batch_size": AT_LEAST_1,
    "finetune.lr": AT_LEAST_0,
    "finetune.min_lr": AT_LEAST_0,
    "finetune.warmup_epochs": AT_LEAST_0,
    "finetune.weight_decay": AT_LEAST_0,
    "finetune.layer_decay": FRACTION,
    "finetune.drop_path_rate": BELOW_1,
    "finetune.mixup": AT_LEAST_0,
    "finetune.cutmix": AT_LEAST_0,
    "finetune.label_smoothing": BELOW_1,
    "finetune.erasing_prob": PROBABILITY,
    "launch.nprocs": AT_LEAST_1,
    "launch.nodes": AT_LEAST_1,
    "launch.tasks_per_node": AT_LEAST_1,
    "launch.gpus_per_node": AT_LEAST_0,
    "launch.cpus_per_task": AT_LEAST_1,
    "launch.mem_gb": POSITIVE,
    "launch.timeout_min": AT_LEAST_1,
    "launch.max_num_timeout": AT_LEAST_0,
    "launch.signal_delay_s": AT_LEAST_0,
    "launch.poll_seconds": POSITIVE,
}


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _check_ranges(config: Config) -> None:
    for key, allowed in RANGES.items():
        value = _value(config, key)
        if isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"{key} must not be empty")
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(f"{key}={list(value)}: every value must be {allowed}, got {bad}")
        elif value is not None and not isinstance(value, str) and value not in allowed:
            raise ConfigError(f"{key} must be {allowed}, got {value}")


def _check_combinations(config: Config) -> None:
    """Rules between keys: errors where the combination cannot run, warnings where it is merely odd."""
    weights = (config.loss.instance_weight, config.loss.local_group_weight, config.loss.group_weight)
    if sum(weights) == 0:
        raise ConfigError("loss.instance_weight, loss.local_group_weight, loss.group_weight are all 0")
    if config.loss.local_group_weight > 0 and config.loss.local_group_knn_top_n > (
        config.loss.local_group_queue_size
    ):
        raise ConfigError(
            f"loss.local_group_knn_top_n={config.loss.local_group_knn_top_n} exceeds "
            f"loss.local_group_queue_size={config.loss.local_group_queue_size}"
        )
    for key in ("global_scale", "local_scale"):
        low, high = getattr(config.augment, key)
        if low > high:
            raise ConfigError(f"augment.{key}={[low, high]}: the lower bound exceeds the upper one")
    patch = config.model.patch_size
    for key in ("global_size", "local_size"):
        size = getattr(config.augment, key)
        if size % patch:
            raise ConfigError(f"augment.{key}={size} is not a multiple of model.patch_size={patch}")
    global_size, local_size = config.augment.global_size, config.augment.local_size
    if config.augment.n_local and local_size > global_size:
        _warn(
            f"augment.local_size={local_size} exceeds augment.global_size={global_size}: local crops are "
            "meant to be the small views"
        )
    depth = config.model.depth or (24 if config.model.arch == "vit_large" else 12)
    if config.evaluate.linear_n_last_blocks > depth:
        raise ConfigError(
            f"evaluate.linear_n_last_blocks={config.evaluate.linear_n_last_blocks} exceeds the model's "
            f"{depth} blocks (model.arch={config.model.arch}, model.depth={config.model.depth})"
        )
    for section in ("optim", "finetune"):
        settings = getattr(config, section)
        if settings.warmup_epochs > settings.epochs:
            raise ConfigError(
                f"{section}.warmup_epochs={settings.warmup_epochs} exceeds {section}.epochs={settings.epochs}"
            )
        if settings.min_lr > settings.lr:
            _warn(
                f"{section}.min_lr={settings.min_lr:g} exceeds {section}.lr={settings.lr:g}: the learning "
                "rate rises after the warm-up"
            )
    optim = config.optim
    subset = config.data.train_subset
    if subset is not None and subset < optim.batch_size:
        raise ConfigError(
            f"data.train_subset={subset} is smaller than one global batch "
            f"(optim.batch_size={optim.batch_size})"
        )
    for key, epoch in (
        ("optim.clip_grad_late_epoch", optim.clip_grad_late_epoch),
        ("optim.freeze_last_layer", optim.freeze_last_layer),
        ("loss.group_warmup_teacher_temp_epochs", config.loss.group_warmup_teacher_temp_epochs),
    ):
        if epoch is not None and epoch > optim.epochs:
            _warn(f"{key}={epoch} lies beyond optim.epochs={optim.epochs}")
    data = config.data
    if data.source == "fashion-mnist" and data.classes is not None:
        from mugs.data.sources import FASHION_MNIST_CLASSES  # numpy and PIL: only for a class list

        unknown = [name for name in data.classes if name not in FASHION_MNIST_CLASSES]
        if unknown:
            raise ConfigError(
                f"data.classes {unknown} are not Fashion-MNIST classes; valid: {FASHION_MNIST_CLASSES}"
            )
    launch = config.launch
    if launch.launcher == "slurm":
        world_size = launch.nodes * launch.tasks_per_node
        if optim.batch_size % world_size:
            raise ConfigError(
                f"optim.batch_size={optim.batch_size} does not divide by the world size {world_size} "
                f"(launch.nodes={launch.nodes} × launch.tasks_per_node={launch.tasks_per_node})"
            )
        if launch.gpus_per_node and launch.tasks_per_node != launch.gpus_per_node:
            raise ConfigError(
                f"launch.tasks_per_node={launch.tasks_per_node} must equal launch.gpus_per_node="
                f"{launch.gpus_per_node}: one rank per GPU"
            )
    if launch.signal_delay_s >= launch.timeout_min * 60:
        raise ConfigError(
            f"launch.signal_delay_s={launch.signal_delay_s} leaves no time to run within "
            f"launch.timeout_min={launch.timeout_min}"
        )


def _warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=4)


def config_from_dict(
    values: dict[str, Any], overrides: Sequence[str] = (), preset: str | None = None
) -> Config:
    """Build and validate a :class:`Config`: the ``preset`` (else the values' ``preset`` key) underneath,
    the values on top, then the ``key=value`` overrides."""
    values = dict(values or {})
    file_preset = values.pop("preset", None)
    preset = preset or file_preset
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        base = PRESETS[preset]
    merged = merge_values(base, values)
    for text in overrides:
        merged = merge_values(merged, parse_override(text))
    config = _build(Config, merged, "")
    _check_ranges(config)
    _check_combinations(config)
    return config


# Keys of a pipeline parameter file that are not part of one run's Config: the named runs (each a
# set of overrides on top of the shared values), the evaluations the workflow runs, and its per-rule
# cluster resources.
PIPELINE_KEYS = ("runs", "protocols", "resources", "container_image")


# A run's name: it names directories and commands, and is the workflow's `{run}` wildcard
# (workflow/rules/common.smk imports it; the schema's `runs:` pattern is the same).
RUN_NAME = "[A-Za-z0-9_-]+"
# the values in which `{run}` stands for the run's name
RUN_PLACEHOLDER_KEYS = (("train", "output_dir"), ("evaluate", "cache_dir"))


def check_run_name(run: str) -> str:
    """``run``, if it is a valid run name (:data:`RUN_NAME`); else a ``ConfigError`` naming it."""
    if not re.fullmatch(RUN_NAME, run):
        raise ConfigError(
            f"run name {run!r} may hold only letters, digits, '_' and '-' ({RUN_NAME}): "
            "it names the run's directories and the workflow's targets"
        )
    return run


def substitute_run(config: Config, run: str) -> Config:
    """Replace ``{run}`` in the :data:`RUN_PLACEHOLDER_KEYS` values with the run's name (after every
    override, so that ``--set train.output_dir=…/{run}`` works as the file's value does)."""
    for section, key in RUN_PLACEHOLDER_KEYS:
        part = getattr(config, section)
        setattr(part, key, getattr(part, key).replace("{run}", run))
    return config


def resolve_run(values: dict[str, Any], run: str | None) -> dict[str, Any]:
    """One run's plain values from a pipeline file: shared values, then ``runs[run]`` on top (``{run}``
    is left for :func:`substitute_run`)."""
    values = dict(values)
    runs = values.pop("runs", None)
    for key in PIPELINE_KEYS:
        values.pop(key, None)
    if run is None:
        if runs:
            raise ConfigError(f"this file defines runs ({', '.join(runs)}): choose one with --run NAME")
        return values
    check_run_name(run)
    if not runs or run not in runs:
        known = ", ".join(runs) if runs else "none"
        raise ConfigError(f"unknown run {run!r}; runs defined under 'runs:': {known}")
    return merge_values(values, runs[run] or {})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def files_shaping_run(paths: Sequence[str | Path], run: str) -> list[str]:
    """Those of the pipeline files ``paths`` that can change ``run``'s settings: every file with a
    value outside ``runs:``, and every file that defines ``runs.<run>``.

    The others only add other runs. Leaving them out of a run's commands keeps its jobs' recorded
    parameters as they were, so a ``--configfile`` that adds a run reruns nothing of the existing ones.
    """
    shaping = []
    for path in paths:
        values = read_yaml(path)
        if set(values) - {"runs"} or run in (values.get("runs") or {}):
            shaping.append(str(path))
    return shaping


def load_config(
    paths: str | Path | Sequence[str | Path],
    overrides: Sequence[str] = (),
    run: str | None = None,
    preset: str | None = None,
) -> Config:
    """Read YAML config files (or one ``run`` of pipeline files); errors name the files and the key.

    Later files are merged over earlier ones key by key, nested mappings included, as Snakemake
    merges ``params.yaml`` with each ``--configfile``: a file can add a run or change one value.
    ``preset`` (else a ``preset:`` key of the files) lies underneath the files; ``overrides`` on top.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    values: dict[str, Any] = {}
    for path in paths:
        values = merge_values(values, read_yaml(path))
    try:
        config = config_from_dict(resolve_run(values, run), overrides, preset)
    except ConfigError as error:
        raise ConfigError(f"{' + '.join(map(str, paths))}: {error}") from None
    return config if run is None else substitute_run(config, run)
