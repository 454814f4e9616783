"""One typed configuration, loaded from YAML: each key is a field below with its type, allowed values,
description and the published ViT-S/16 100-epoch value (``sail-sg/mugs`` ``pretraining.sh``) as default;
presets (``mugs/presets``) change a few. Snakemake's schema for ``params.yaml`` is made from these."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from annotated_types import Interval
from pydantic import AllowInfNan, BeforeValidator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from mugs.fashion_mnist import FASHION_MNIST_CLASSES


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range; the message names it."""


class ConfigWarning(UserWarning):
    """A configuration that runs but is probably not what was meant; the message names the keys."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax float would read True as 1.0
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


def _float(**bounds: float) -> Any:
    """A float within ``bounds``, from an int or numeric text too (YAML 1.1 reads "1e-3" as a string)."""
    return Annotated[float, AllowInfNan(False), Interval(**bounds), BeforeValidator(_not_bool)]


# an int is no bool or text
Int, Bool, Str = (Annotated[kind, pydantic.Strict()] for kind in (int, bool, str))
Count, Natural = Annotated[Int, Interval(ge=1)], Annotated[Int, Interval(ge=0)]
NonNegative, Positive, Probability = _float(ge=0), _float(gt=0), _float(ge=0, le=1)
BelowOne, Fraction = _float(ge=0, lt=1), _float(gt=0, le=1)
Device = Literal["auto", "cpu", "cuda"]
Float = _float()
# the long jobs besides pretraining that go through the launcher, each with its own resources
JobKind = Literal["finetune"]
section = dataclass(config=pydantic.ConfigDict(extra="forbid"))


def _field(default: Any, description: str, **bounds: Any) -> Any:
    """A field's default and description; each instance gets its own list, mapping or section."""
    if isinstance(default, (list, dict)):
        return pydantic.Field(default_factory=default.copy, description=description, **bounds)
    if isinstance(default, type):
        return pydantic.Field(default_factory=default, description=description)
    return pydantic.Field(default, description=description, **bounds)


def _list(default: list[Any], description: str) -> Any:
    return _field(default, description, min_length=1)


@section
class ModelConfig:
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = _field("vit_small", "ViT size")
    depth: Count | None = _field(None, "Transformer blocks; null: the size's own (12, or 24 for vit_large)")
    patch_size: Count = _field(16, "Side of a square patch, in pixels")
    drop_path_rate: BelowOne = _field(0.1, "Stochastic depth rate of the last block (linear from 0)")
    use_bn_in_head: Bool = _field(False, "Batch norm in the projection heads")
    norm_before_pred: Bool = _field(True, "Normalise the projection before the instance/local predictors")
    norm_last_layer: Bool = _field(False, "Fix the norm of the group head's last (weight-normed) layer")
    hidden_dim: Count = _field(2048, "Hidden width of the projection heads")
    out_dim: Count = _field(256, "Output width of the instance and local-group heads")
    predictor_hidden_dim: Count = _field(4096, "Hidden width of the student's predictors")
    group_out_dim: Count = _field(65536, "Prototypes of the group head")


@section
class LossConfig:
    instance_weight: NonNegative = _field(1.0, "Weight of the instance contrast; 0 disables its head")
    local_group_weight: NonNegative = _field(1.0, "Weight of the local-group contrast; 0 disables its head")
    group_weight: NonNegative = _field(1.0, "Weight of the group discrimination; 0 disables its head")
    instance_queue_size: Count = _field(65536, "Keys in the instance memory")
    instance_temp: Positive = _field(0.2, "Temperature of the instance contrast")
    local_group_queue_size: Count = _field(65536, "Keys in the local-group memory")
    local_group_temp: Positive = _field(0.2, "Temperature of the local-group contrast")
    local_group_knn_top_n: Count = _field(8, "Neighbours aggregated into a local group")
    memory_pointer: Literal["fixed", "official"] = _field("fixed", "official: the public code's 2n stride")
    group_student_temp: Positive = _field(0.1, "Student temperature of the group discrimination")
    group_warmup_teacher_temp: Positive = _field(0.04, "Teacher temperature at the start of its warm-up")
    group_teacher_temp: Positive = _field(0.04, "Teacher temperature after its warm-up")
    group_warmup_teacher_temp_epochs: Natural = _field(0, "Epochs of the teacher temperature's warm-up")

    def weights(self) -> dict[str, float]:
        """The enabled supervisions (weight > 0) and their weights, in METHOD order: which heads the
        networks have and which losses the objective sums are both read from here."""
        weights = {"instance": self.instance_weight, "local_group": self.local_group_weight}
        return {name: w for name, w in {**weights, "group": self.group_weight}.items() if w > 0}


@section
class AugmentConfig:
    global_size: Count = _field(224, "Side of the two global crops, in pixels")
    local_size: Count = _field(96, "Side of the local crops, in pixels")
    n_local: Natural = _field(10, "Local crops per image")
    global_scale: tuple[Fraction, Fraction] = _field((0.25, 1.0), "Area range of a global crop")
    local_scale: tuple[Fraction, Fraction] = _field((0.05, 0.25), "Area range of a local crop")
    weak_prob: Probability = _field(0.5, "Probability that a view gets the weak augmentation")
    rand_augment: Str = _field("rand-m9-mstd0.5-inc1", "timm RandAugment policy of the strong views")
    erasing_prob: Probability = _field(0.25, "Random-erasing probability of the strong views")
    backend: Literal["cpu", "device"] = _field(
        "cpu",
        "Where the views are computed: by the loader processes (the reference) or, from the parameters "
        "they draw, on the training device for the whole batch (mugs.data.device_augment)",
    )


@section
class OptimConfig:
    epochs: Count = _field(100, "Pretraining epochs")
    batch_size: Count = _field(1024, "Global batch, over all ranks")
    lr: NonNegative = _field(8e-4, "Peak learning rate for a batch of 256, scaled linearly")
    min_lr: NonNegative = _field(1e-6, "Learning rate at the end of the cosine decay")
    warmup_epochs: Natural = _field(10, "Epochs of linear learning-rate warm-up")
    weight_decay: NonNegative = _field(0.04, "Weight decay at the start (cosine schedule)")
    weight_decay_end: NonNegative = _field(0.2, "Weight decay at the end")
    momentum_teacher: Probability = _field(0.996, "EMA momentum of the teacher at the start (to 1 by cosine)")
    clip_grad: NonNegative = _field(3.0, "Gradient-norm clip per tensor; 0 disables")
    clip_grad_late_epoch: Natural | None = _field(None, "Epoch after which the clip is scaled (ViT-L: 100)")
    clip_grad_late_factor: NonNegative = _field(0.1, "Factor on the clip after clip_grad_late_epoch")
    patch_embed_lr_mult: NonNegative = _field(0.2, "Learning-rate multiplier of the patch embedding")
    freeze_last_layer: Natural = _field(1, "Epochs during which the group head's last layer is frozen")
    precision: Literal["fp32", "bf16", "fp16"] = _field("fp32", "Autocast precision on a GPU")


@section
class DataConfig:
    source: Literal["fashion-mnist", "imagefolder"] = _field("fashion-mnist", "Dataset layout")
    root: Str = _field("data/fashion-mnist", "The raw dataset directory (tracked by data.dvc)")
    prepared_dir: Str = _field("results/data", "Manifests and statistics written by `mugs prepare`")
    val_fraction: BelowOne = _field(0.1, "Held out of train when the source has no validation split")
    split_seed: Natural = _field(0, "Seed of that hold-out")
    on_bad_image: Literal["skip", "error"] = _field("skip", "What an undecodable image does to `prepare`")
    classes: list[Str] | None = _field(None, "The classes to keep; null: all")
    max_per_class: Count | None = _field(None, "Images kept per class and split; null: all")
    workers: Natural | Literal["auto"] = _field(
        "auto",
        "Processes of `mugs prepare` for scanning and decoding; auto: the cores the job may use "
        "(SLURM_CPUS_PER_TASK, else the process's CPU affinity); results do not depend on it",
    )
    train_subset: Count | None = _field(None, "Train on the first N of a seeded permutation; null: all")


@section
class TrainConfig:
    output_dir: Str = _field("results/run", "The run directory (checkpoints, log, DONE)")
    seed: Natural = _field(0, "Seed of the weights, the data order and the augmentations")
    device: Device = _field("auto", "Training device; auto: cuda when present")
    num_workers: Natural | Literal["auto"] = _field(
        "auto",
        "Data-loader processes per rank; auto: on a GPU, the cores this rank may use less one for itself "
        "(the multi-crop augmentation bounds a step: docs/benchmarks.md), on the CPU 0",
    )
    threads: Count | None = _field(None, "torch intra-op threads on CPU; null leaves torch's default")
    log_every: Count = _field(50, "Iterations between JSON log lines")
    checkpoint_every: Natural = _field(500, "Iterations between refreshes of latest.pt; 0: epoch ends only")
    keep_every_epochs: Natural = _field(10, "Keep a checkpoint every N epochs (and the last); 0 keeps none")
    max_iterations: Count | None = _field(None, "Stop (with a checkpoint) after this global iteration")
    compile: Bool = _field(False, "torch.compile the networks")
    stop_on_collapse: Bool = _field(False, "Stop when the representation collapses")
    init_from: Str | None = _field(None, "A checkpoint to start a new run from (e.g. `mugs import-official`)")


@section
class FinetuneConfig:
    epochs: Count = _field(100, "Fine-tuning epochs (METHOD §8, the BEiT / iBOT recipe)")
    batch_size: Count = _field(1024, "Global batch, over all ranks")
    lr: NonNegative = _field(1.2e-3, "Peak learning rate for a batch of 256, scaled linearly")
    min_lr: NonNegative = _field(1e-6, "Learning rate at the end of the cosine decay")
    warmup_epochs: Natural = _field(5, "Epochs of linear learning-rate warm-up")
    weight_decay: NonNegative = _field(0.05, "Weight decay")
    layer_decay: Fraction = _field(0.55, "Layer-wise learning-rate decay (0.75 for vit_large)")
    drop_path_rate: BelowOne = _field(0.1, "Stochastic depth rate")
    mixup: NonNegative = _field(0.8, "Mixup alpha; 0 disables")
    cutmix: NonNegative = _field(1.0, "CutMix alpha; 0 disables")
    label_smoothing: BelowOne = _field(0.1, "Label smoothing")
    rand_augment: Str = _field("rand-m9-mstd0.5-inc1", "timm RandAugment policy")
    erasing_prob: Probability = _field(0.25, "Random-erasing probability")
    checkpoint_key: Literal["teacher", "student"] = _field("teacher", "Which pretrained network to tune")
    precision: Literal["fp32", "bf16"] = _field("fp32", "Autocast precision")
    checkpoint_every: Natural = _field(
        500, "Iterations between refreshes of the resumable state; 0: epoch ends"
    )


@section
class EvalConfig:
    network: Literal["teacher", "student"] = _field("teacher", "Which network's features are evaluated")
    device: Device = _field("auto", "Evaluation device; auto: cuda when present")
    batch_size: Count = _field(256, "Images per forward pass while extracting features")
    num_workers: Natural = _field(4, "Data-loader processes while extracting features")
    cache_dir: Str = _field("results/features", "Extracted features, keyed by checkpoint hash and transform")
    knn_k: list[Count] = _list([10, 20, 100, 200], "Neighbour counts of the weighted kNN classifier")
    knn_temperature: Positive = _field(0.07, "Temperature of the kNN vote")
    knn_split: Literal["val", "test"] = _field("test", "What `mugs knn` reports; selection always scores val")
    knn_chunk_size: Count = _field(1024, "Queries per similarity block")
    knn_bank_chunk_size: Count = _field(262144, "Bank rows per similarity block (bounds memory on big banks)")
    linear_n_last_blocks: Count = _field(4, "CLS tokens of the last n blocks (ViT-S: 4; B: 1 + avgpool)")
    linear_avgpool: Bool = _field(False, "Append the mean patch token of the last block")
    linear_epochs: Count = _field(100, "Linear-probe epochs")
    linear_protocol: Literal["features", "augmented"] = _field(
        "features",
        "features: the probes read cached centre-crop features (cheap); augmented: the paper's (DINO's) "
        "protocol, each epoch's random-resized crops and flips through the frozen backbone once per batch "
        "for every head of the sweep",
    )
    linear_batch_size: Count = _field(1024, "Linear-probe batch")
    linear_lrs: list[NonNegative] = _list([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1], "Probe lrs per 256")
    linear_weight_decays: list[NonNegative] = _list([0.0, 1e-4], "Linear-probe weight decays swept")
    linear_min_lr: NonNegative = _field(0.0, "Probe learning rate at the end of its cosine decay")
    linear_seed: Natural = _field(0, "Seed of the linear probes")
    fewshot_fractions: list[Fraction] = _list([0.01, 0.1], "Labelled fractions of the few-shot evaluation")
    fewshot_seed: Natural = _field(0, "Seed of the few-shot subsets")
    fewshot_c: list[Positive] = _list([0.1, 1.0, 10.0], "Logistic-regression C values, chosen on val")
    fewshot_max_iter: Count = _field(1000, "Logistic-regression iterations")
    selection_policy: Literal["best_knn", "last"] = _field("best_knn", "Which checkpoint is evaluated")
    selection_k: Count = _field(20, "The k whose val kNN accuracy selects the checkpoint")


@section
class LaunchConfig:
    launcher: Literal["local", "slurm"] = _field("local", "Here, or as one SLURM job through submitit")
    nprocs: Count = _field(1, "Local processes")
    nodes: Count = _field(1, "SLURM nodes")
    tasks_per_node: Count = _field(1, "Ranks per node (one per GPU on GPU nodes)")
    gpus_per_node: Natural = _field(0, "GPUs per node")
    cpus_per_task: Count | None = _field(None, "CPUs per rank; null: the partition's default")
    mem_gb: Positive | None = _field(None, "Memory per node, GB; null: the partition's default")
    timeout_min: Count = _field(1440, "Time limit of the job, minutes")
    partition: Str | None = _field(None, "null: the cluster's default partition")
    account: Str | None = _field(None, "SLURM account")
    qos: Str | None = _field(None, "SLURM quality of service")
    constraint: Str | None = _field(None, "SLURM node constraint")
    sbatch_extra: dict[str, Str | Int | Bool] = _field({}, "Further sbatch options, e.g. {exclusive: true}")
    max_num_timeout: Natural = _field(20, "Requeues after a time limit (preemptions are not counted)")
    signal_delay_s: Natural = _field(120, "Checkpoint this long before the limit: one iteration and a write")
    container: Str | None = _field(None, "Run the job's Python in this image on every node")
    container_bind: list[Str] = _field([], '"SRC[:DEST[:OPTS]]" binds into the container')
    container_runtime: Literal["apptainer", "podman"] = _field("apptainer", "apptainer: a .sif or a URI")
    container_options: list[Str] = _field([], "Runtime options before the image, e.g. [--runtime, runc]")
    poll_seconds: Positive = _field(10.0, "Seconds between looks at the SLURM job")
    jobs: dict[JobKind, dict[str, Str | Int | Float | Bool | None]] = _field(
        {}, "Per job kind, the launch.* keys it sets otherwise than pretraining, e.g. {finetune: {nodes: 1}}"
    )


@section
class Config:
    model: ModelConfig = _field(ModelConfig, "The networks")
    loss: LossConfig = _field(LossConfig, "The three supervisions")
    augment: AugmentConfig = _field(AugmentConfig, "The multi-crop views")
    optim: OptimConfig = _field(OptimConfig, "Pretraining's optimiser and schedules")
    data: DataConfig = _field(DataConfig, "The dataset and its preparation")
    train: TrainConfig = _field(TrainConfig, "The pretraining run")
    evaluate: EvalConfig = _field(EvalConfig, "Frozen-feature evaluations (METHOD §8), checkpoint selection")
    finetune: FinetuneConfig = _field(FinetuneConfig, "End-to-end fine-tuning")
    launch: LaunchConfig = _field(LaunchConfig, "Where pretraining runs: here, or one (requeued) SLURM job")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for tuples) that YAML, JSON and ``torch.load(weights_only=True)`` accept."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """SHA-256 of the resolved configuration, stable across key order."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @pydantic.model_validator(mode="after")
    def check_rules(self) -> Config:
        """Rules between keys: errors where the combination cannot run, warnings where it is merely odd."""
        model, loss, augment, optim, data, launch = (
            getattr(self, key) for key in ("model", "loss", "augment", "optim", "data", "launch")
        )
        if not loss.weights():
            raise ValueError("loss.instance_weight, loss.local_group_weight, loss.group_weight are all 0")
        top_n, queue = loss.local_group_knn_top_n, loss.local_group_queue_size
        if loss.local_group_weight > 0 and top_n > queue:
            raise ValueError(
                f"loss.local_group_knn_top_n={top_n} exceeds loss.local_group_queue_size={queue}"
            )
        for key in ("global_scale", "local_scale"):
            if (scale := list(getattr(augment, key)))[0] > scale[1]:
                raise ValueError(f"augment.{key}={scale}: the lower bound exceeds the upper one")
        for key in ("global_size", "local_size"):
            if (size := getattr(augment, key)) % (patch := model.patch_size):
                raise ValueError(f"augment.{key}={size} is not a multiple of model.patch_size={patch}")
        if augment.n_local and (local := augment.local_size) > (size := augment.global_size):
            _warn(
                f"augment.local_size={local} exceeds augment.global_size={size}: local crops are small views"
            )
        depth, blocks = (
            model.depth or (24 if model.arch == "vit_large" else 12),
            self.evaluate.linear_n_last_blocks,
        )
        if blocks > depth:
            raise ValueError(
                f"evaluate.linear_n_last_blocks={blocks} exceeds the model's {depth} blocks "
                f"(model.arch={model.arch}, model.depth={model.depth})"
            )
        for key, s in (("optim", optim), ("finetune", self.finetune)):
            if s.warmup_epochs > s.epochs:
                raise ValueError(f"{key}.warmup_epochs={s.warmup_epochs} exceeds {key}.epochs={s.epochs}")
            if s.min_lr > s.lr:
                _warn(
                    f"{key}.min_lr={s.min_lr:g} exceeds {key}.lr={s.lr:g}: the rate rises after the warm-up"
                )
        if (subset := data.train_subset) is not None and subset < (batch := optim.batch_size):
            raise ValueError(
                f"data.train_subset={subset} is smaller than one global batch (optim.batch_size={batch})"
            )
        for key, epoch in (
            ("optim.clip_grad_late_epoch", optim.clip_grad_late_epoch),
            ("optim.freeze_last_layer", optim.freeze_last_layer),
            ("loss.group_warmup_teacher_temp_epochs", loss.group_warmup_teacher_temp_epochs),
        ):
            if epoch is not None and epoch > optim.epochs:
                _warn(f"{key}={epoch} lies beyond optim.epochs={optim.epochs}")
        unknown = [name for name in data.classes or () if name not in FASHION_MNIST_CLASSES]
        if data.source == "fashion-mnist" and unknown:
            raise ValueError(
                f"data.classes {unknown} are not Fashion-MNIST classes; valid: {FASHION_MNIST_CLASSES}"
            )
        nodes, tasks, gpus = launch.nodes, launch.tasks_per_node, launch.gpus_per_node
        if launch.launcher == "slurm" and optim.batch_size % (nodes * tasks):
            raise ValueError(
                f"optim.batch_size={optim.batch_size} does not divide by the world size "
                f"{nodes * tasks} (launch.nodes={nodes} × launch.tasks_per_node={tasks})"
            )
        if launch.launcher == "slurm" and gpus not in (0, tasks):
            raise ValueError(
                f"launch.tasks_per_node={tasks} must equal launch.gpus_per_node={gpus}: one rank per GPU"
            )
        for kind in launch.jobs:
            launch_of(launch, kind)
        if (delay := launch.signal_delay_s) >= (limit := launch.timeout_min) * 60:
            raise ValueError(
                f"launch.signal_delay_s={delay} leaves no time to run within launch.timeout_min={limit}"
            )
        return self


def launch_of(launch: LaunchConfig, kind: str) -> LaunchConfig:
    """The launch settings of job kind ``kind``: ``launch.*`` with ``launch.jobs[kind]`` on top."""
    values = {**dataclasses.asdict(launch), **launch.jobs.get(kind, {}), "jobs": {}}
    try:
        return LaunchConfig(**values)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"launch.jobs.{kind}: {problems}") from None


def for_job(config: Config, kind: str) -> Config:
    """A copy of ``config`` whose ``launch`` is job kind ``kind``'s (:func:`launch_of`); pretraining's
    other rules are not checked again (its batch need not divide a fine-tuning job's ranks)."""
    job = copy.copy(config)
    job.launch = launch_of(config.launch, kind)
    return job


def _warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=3)


CONFIG = pydantic.TypeAdapter(Config)
# the pydantic error types that say what a value should be, and the name users know that type by
_EXPECTED = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "list", "tuple": "list"}
_EXPECTED |= {"dict": "a mapping", "dataclass": "a mapping"}


def _expected(error: Any) -> str | None:
    if error["type"] == "literal_error":
        return "one of " + error["ctx"]["expected"]
    return _EXPECTED.get(error["type"].split("_")[0])


def _explain(error: pydantic.ValidationError, values: dict[str, Any]) -> str:
    """pydantic's first error as one line naming the key and the value, in the words of the YAML file."""
    first, *others = error.errors()
    loc = first["loc"]
    key = ".".join(map(str, loc[:2]))
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        cls: Any = Config
        for name in loc[:-1]:
            cls = typing.get_type_hints(cls)[name]
        return f"unknown key '{key}'; valid keys here: {', '.join(f.name for f in dataclasses.fields(cls))}"
    if _expected(first):  # an int | "auto" union fails once for each arm
        arms = [_expected(e) for e in [first, *others] if e["loc"][:2] == loc[:2]]
        return f"{key}: expected {' or '.join(dict.fromkeys(filter(None, arms)))}, got {first['input']!r}"
    if first["type"] == "value_error":  # a rule between keys, which names them
        return str(first["ctx"]["error"])
    value = values.get(loc[0], {}).get(loc[1], first["input"]) if len(loc) > 1 else first["input"]
    items = "".join(f" (item {index})" for index in loc[2:] if isinstance(index, int))
    return f"{key}={value}{items}: {first['msg']}"


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


# Published settings (sail-sg/mugs pretraining.sh) and small ones that run on a laptop CPU, each the
# values it changes over the defaults above.
PRESETS = {path.stem: read_yaml(path) for path in sorted((Path(__file__).parent / "presets").glob("*.yaml"))}


def config_from_dict(
    values: dict[str, Any], overrides: Sequence[str] = (), preset: str | None = None
) -> Config:
    """Build and validate a :class:`Config`: the ``preset`` (else the values' ``preset`` key) underneath,
    the values on top, then the ``key=value`` overrides."""
    values = dict(values or {})
    file_preset = values.pop("preset", None)
    preset = preset or file_preset
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    merged = merge_values(PRESETS[preset] if preset else {}, values)
    for text in overrides:
        merged = merge_values(merged, parse_override(text))
    try:
        return CONFIG.validate_python(merged)
    except pydantic.ValidationError as error:
        raise ConfigError(_explain(error, merged)) from None


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


def files_shaping_run(paths: Sequence[str | Path], run: str) -> list[str]:
    """The pipeline files that can change ``run``'s settings: those with a value outside ``runs:`` or a
    ``runs.<run>``. The others only add runs: left out of this run's commands, they rerun nothing of it."""
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
    """Read YAML config files (or one ``run`` of pipeline files), each merged over the ones before key by
    key as Snakemake merges ``--configfile``s; ``preset`` (else the files' ``preset:``) lies underneath,
    ``overrides`` on top. Errors name the files and the key."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    values: dict[str, Any] = {}
    for path in paths:
        values = merge_values(values, read_yaml(path))
    try:
        config = config_from_dict(resolve_run(values, run), overrides, preset)
    except ConfigError as error:
        raise ConfigError(f"{' + '.join(map(str, paths))}: {error}") from None
    return config if run is None else substitute_run(config, run)
