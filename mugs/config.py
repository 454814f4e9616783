"""One typed configuration for everything the package computes, loaded from YAML.

Every hyper-parameter of the method lives here with the published ViT-S/16 100-epoch value as its
default (``sail-sg/mugs`` ``pretraining.sh``).  Unknown keys and wrongly typed values are errors that
name the key, so a typo in ``params.yaml`` fails before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
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

    def __post_init__(self) -> None:
        # list elements escape the loader's float coercion ("1e-3" stays a string), so convert here
        for key in ("linear_lrs", "linear_weight_decays", "fewshot_fractions", "fewshot_c"):
            setattr(self, key, [float(v) for v in getattr(self, key)])
        positive = ("batch_size", "knn_temperature", "knn_chunk_size", "knn_bank_chunk_size")
        positive += ("linear_n_last_blocks", "linear_epochs", "linear_batch_size", "fewshot_max_iter")
        for key in (*positive, "selection_k"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"evaluate.{key} must be positive, got {getattr(self, key)}")
        for key in ("knn_k", "linear_lrs", "linear_weight_decays", "fewshot_fractions", "fewshot_c"):
            if not getattr(self, key):
                raise ConfigError(f"evaluate.{key} must not be empty")
        checks = {
            "knn_k": lambda v: v > 0,
            "linear_lrs": lambda v: v >= 0,
            "linear_weight_decays": lambda v: v >= 0,
            "fewshot_fractions": lambda v: 0 < v <= 1,
            "fewshot_c": lambda v: v > 0,
        }
        for key, ok in checks.items():
            bad = [v for v in getattr(self, key) if not ok(v)]
            if bad:
                raise ConfigError(f"evaluate.{key} has out-of-range values {bad}")


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

    def __post_init__(self) -> None:
        at_least = {"nprocs": 1, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "timeout_min": 1}
        at_least |= {"max_num_timeout": 0, "signal_delay_s": 0, "cpus_per_task": 1}
        for key, low in at_least.items():
            value = getattr(self, key)
            if value is not None and value < low:
                raise ConfigError(f"launch.{key} must be >= {low}, got {value}")
        for key in ("mem_gb", "poll_seconds"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"launch.{key} must be positive, got {value}")
        if self.signal_delay_s >= self.timeout_min * 60:
            raise ConfigError(
                f"launch.signal_delay_s={self.signal_delay_s} leaves no time to run within "
                f"launch.timeout_min={self.timeout_min}"
            )


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
        "loss": {"instance_queue_size": 4096, "local_group_queue_size": 4096},
        "augment": {"global_size": 28, "local_size": 14, "n_local": 2, "global_scale": [0.4, 1.0]},
        "optim": {"epochs": 3, "batch_size": 64, "lr": 5e-4, "warmup_epochs": 1},
        "data": {"train_subset": 6400},
        # on 2 cores, augmenting in the training process beats a loader process fighting for the cores
        "train": {"num_workers": 0, "log_every": 10, "checkpoint_every": 50, "keep_every_epochs": 2},
        # cached features make probe epochs cheap; on these features the best lr lies above ImageNet's
        "evaluate": {
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


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-3"`` → ``{"optim": {"lr": 0.001}}`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    nested: dict[str, Any] = {}
    cursor = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = value
    return nested


def _check_ranges(config: Config) -> None:
    positive = {
        "model.patch_size": config.model.patch_size,
        "optim.epochs": config.optim.epochs,
        "optim.batch_size": config.optim.batch_size,
        "augment.global_size": config.augment.global_size,
        "augment.local_size": config.augment.local_size,
        "loss.local_group_knn_top_n": config.loss.local_group_knn_top_n,
        "loss.instance_queue_size": config.loss.instance_queue_size,
        "loss.local_group_queue_size": config.loss.local_group_queue_size,
        "model.group_out_dim": config.model.group_out_dim,
        "train.log_every": config.train.log_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    weights = (config.loss.instance_weight, config.loss.local_group_weight, config.loss.group_weight)
    if any(w < 0 for w in weights) or sum(weights) == 0:
        raise ConfigError(
            "loss.instance_weight, loss.local_group_weight, loss.group_weight must be >= 0 "
            f"and not all 0, got {weights}"
        )
    workers = config.train.num_workers
    if workers != "auto" and workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0 or 'auto', got {workers}")
    if config.augment.n_local < 0:
        raise ConfigError(f"augment.n_local must be >= 0, got {config.augment.n_local}")
    for key in ("weak_prob", "erasing_prob"):
        value = getattr(config.augment, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"augment.{key} must lie in [0, 1], got {value}")
    for key in ("global_scale", "local_scale"):
        low, high = getattr(config.augment, key)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"augment.{key} must satisfy 0 < low <= high <= 1, got {[low, high]}")
    if config.loss.local_group_weight > 0 and config.loss.local_group_knn_top_n > (
        config.loss.local_group_queue_size
    ):
        raise ConfigError("loss.local_group_knn_top_n must not exceed loss.local_group_queue_size")
    for key in ("global_size", "local_size"):
        size = getattr(config.augment, key)
        if size % config.model.patch_size:
            raise ConfigError(
                f"augment.{key}={size} is not a multiple of model.patch_size={config.model.patch_size}"
            )
    depth = config.model.depth or (24 if config.model.arch == "vit_large" else 12)
    if config.evaluate.linear_n_last_blocks > depth:
        raise ConfigError(
            f"evaluate.linear_n_last_blocks={config.evaluate.linear_n_last_blocks} exceeds the model's "
            f"{depth} blocks (model.arch={config.model.arch}, model.depth={config.model.depth})"
        )
    if config.data.max_per_class is not None and config.data.max_per_class <= 0:
        raise ConfigError(f"data.max_per_class must be positive or null, got {config.data.max_per_class}")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {config.data.val_fraction}")
    if config.optim.warmup_epochs > config.optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs={config.optim.warmup_epochs} exceeds optim.epochs={config.optim.epochs}"
        )
    tune = config.finetune
    if tune.epochs <= 0 or tune.batch_size <= 0 or not 0 <= tune.warmup_epochs <= tune.epochs:
        raise ConfigError(
            "finetune.epochs and finetune.batch_size must be positive and 0 <= finetune.warmup_epochs "
            f"<= finetune.epochs, got {tune.epochs}, {tune.batch_size}, {tune.warmup_epochs}"
        )
    if not 0.0 < tune.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must lie in (0, 1], got {tune.layer_decay}")


def config_from_dict(values: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Build and validate a :class:`Config` from plain data, a ``preset`` key and ``key=value`` overrides."""
    values = dict(values or {})
    preset = values.pop("preset", None)
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
    return config


# Keys of a pipeline parameter file that are not part of one run's Config: the named runs (each a
# set of overrides on top of the shared values), the evaluations the workflow runs, and its per-rule
# cluster resources.
PIPELINE_KEYS = ("runs", "protocols", "resources", "container_image")


def resolve_run(values: dict[str, Any], run: str | None) -> dict[str, Any]:
    """One run's plain values from a pipeline file: shared values, then ``runs[run]`` on top.

    ``{run}`` in ``train.output_dir`` and ``evaluate.cache_dir`` is replaced by the run's name.
    """
    values = dict(values)
    runs = values.pop("runs", None)
    for key in PIPELINE_KEYS:
        values.pop(key, None)
    if run is None:
        if runs:
            raise ConfigError(f"this file defines runs ({', '.join(runs)}): choose one with --run NAME")
        return values
    if not runs or run not in runs:
        known = ", ".join(runs) if runs else "none"
        raise ConfigError(f"unknown run {run!r}; runs defined under 'runs:': {known}")
    merged = merge_values(values, runs[run] or {})
    for section, key in (("train", "output_dir"), ("evaluate", "cache_dir")):
        text = merged.get(section, {}).get(key)
        if isinstance(text, str) and "{run}" in text:
            merged[section] = {**merged[section], key: text.replace("{run}", run)}
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
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
    paths: str | Path | Sequence[str | Path], overrides: list[str] = (), run: str | None = None
) -> Config:
    """Read YAML config files (or one ``run`` of pipeline files); errors name the files and the key.

    Later files are merged over earlier ones key by key, nested mappings included, as Snakemake
    merges ``params.yaml`` with each ``--configfile``: a file can add a run or change one value.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    values: dict[str, Any] = {}
    for path in paths:
        values = merge_values(values, read_yaml(path))
    try:
        return config_from_dict(resolve_run(values, run), overrides)
    except ConfigError as error:
        raise ConfigError(f"{' + '.join(map(str, paths))}: {error}") from None
