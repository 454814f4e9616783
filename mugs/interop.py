"""Interoperability: import the authors' released Mugs checkpoints, export a backbone for timm.

:func:`import_official_checkpoint` reads a ``sail-sg/mugs`` ``checkpoint.pth`` (METHOD §9) and writes
a checkpoint in this project's format; :func:`export_backbone` takes one of our checkpoints (trained
here or imported) and writes the ViT backbone alone, loadable into a stock timm model.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from mugs.config import PRESETS, Config, config_from_dict
from mugs.files import check_output
from mugs.losses import MugsObjective
from mugs.model import build_networks
from mugs.model.backbone import VIT_SIZES
from mugs.training import checkpoint as ckpt

__all__ = [
    "CheckpointError",
    "OfficialCheckpointError",
    "export_backbone",
    "import_official_checkpoint",
    "read_checkpoint",
    "timm_model_name",
]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or is not what the command needs; the message names the file."""


class OfficialCheckpointError(CheckpointError):
    """A released checkpoint cannot be read or does not match our networks; the message names why."""


# what torch.save's legacy (pre-1.6, non-zip) format starts with: its pickled magic number
_LEGACY_TORCH_HEADER = bytes.fromhex("80028a0a6cfc9c46f9206aa8")


def _read_torch_file(path: Path, *, trust_pickle: bool, foreign_hint: str) -> Any:
    """``torch.load`` of ``path`` (memory-mapped when it is a zip archive) with one-line errors.

    A file that is not a ``torch.save`` file at all (text, an image, a truncated archive) is said to
    be so; unpickling is only suggested for a torch file whose pickle really names unsafe classes.
    """
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory, not a checkpoint file")
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    archive = zipfile.is_zipfile(path)
    with path.open("rb") as handle:
        legacy = handle.read(len(_LEGACY_TORCH_HEADER)) == _LEGACY_TORCH_HEADER
    if not archive and not legacy:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (a truncated file or another kind of file)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
    except pickle.UnpicklingError as refusal:
        unsafe = _unsafe_globals(path, archive, refusal)
        if not unsafe:
            raise CheckpointError(f"{path} is a truncated or corrupt PyTorch checkpoint") from None
        if not trust_pickle:
            what = (
                "pickles an argparse `args` object (older Mugs releases do)"
                if "argparse.Namespace" in unsafe
                else f"pickles {', '.join(unsafe)}, which a weights-only load refuses"
            )
            raise CheckpointError(
                f"{path} {what}; reading it means unpickling, which can run arbitrary code. {foreign_hint}"
            ) from None
    except Exception:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"{path} is a truncated or corrupt PyTorch checkpoint") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise CheckpointError(f"{path} is a truncated or corrupt PyTorch checkpoint") from None


def _unsafe_globals(path: Path, archive: bool, refusal: Exception) -> list[str]:
    """The classes a torch file's pickle names beyond plain data; [] when it names none (it is damaged)."""
    if not archive:
        # the legacy format cannot be listed without unpickling; torch's refusal names the first class
        return re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(refusal))[:1]
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a damaged pickle
        return []


def read_checkpoint(path: str | Path, network: str | None = None) -> dict[str, Any]:
    """One of our checkpoints, memory-mapped; with ``network``, it must hold that network's weights.

    Unlike :func:`mugs.training.checkpoint.load_checkpoint`, every error is one line naming the file.
    """
    path = Path(path)
    payload = _read_torch_file(
        path, trust_pickle=False, foreign_hint="For the authors' released files use `mugs import-official`."
    )
    if not isinstance(payload, dict) or payload.get("format") != ckpt.FORMAT:
        raise CheckpointError(
            f"{path} is not a mugs-pipeline checkpoint (format {ckpt.FORMAT!r} expected); "
            "for the authors' released files use `mugs import-official`"
        )
    for key in ("config", network):
        if key is not None and not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} holds no {key!r} entry")
    return payload


# official loss entry -> our loss name, and the buffer names inside each
_LOSSES = {"instance-sup.": "instance", "local-group-sup.": "local_group", "group-sup.": "group"}
_LOSS_BUFFERS = {"queue": "queue", "queue_ptr": "queue_pointer", "center": "center"}
_TOP_LEVEL = {"student", "teacher", "student_mem", "teacher_mem", "optimizer", "epoch", "args", "fp16_scaler"}
_TOP_LEVEL |= set(_LOSSES)

# The official memory writes every row into three buffers, searches queue_q and returns queue_k;
# queue_v is never read, so it has no counterpart here.
_MEMORY_BUFFERS = {"block.queue_q": "search_keys", "block.queue_k": "values", "block.queue_ptr": "pointer"}
_UNUSED_MEMORY_BUFFERS = {"block.queue_v"}
# torch.nn.utils.weight_norm (old API) -> torch.nn.utils.parametrizations.weight_norm
_WEIGHT_NORM = {
    "group_head.last_layer.weight_g": "group_head.last_layer.parametrizations.weight.original0",
    "group_head.last_layer.weight_v": "group_head.last_layer.parametrizations.weight.original1",
}
# official argparse name -> (config section, key), for values the weights cannot tell
_ARGS_TO_CONFIG = {
    "drop_path_rate": ("model", "drop_path_rate"),
    "norm_before_pred": ("model", "norm_before_pred"),
    "norm_last_layer": ("model", "norm_last_layer"),
    "instance_temp": ("loss", "instance_temp"),
    "local_group_temp": ("loss", "local_group_temp"),
    "local_group_knn_top_n": ("loss", "local_group_knn_top_n"),
    "group_student_temp": ("loss", "group_student_temp"),
    "group_warmup_teacher_temp": ("loss", "group_warmup_teacher_temp"),
    "group_teacher_temp": ("loss", "group_teacher_temp"),
    "group_warmup_teacher_temp_epochs": ("loss", "group_warmup_teacher_temp_epochs"),
    "local_crops_number": ("augment", "n_local"),
    "global_crops_scale": ("augment", "global_scale"),
    "local_crops_scale": ("augment", "local_scale"),
    "prob": ("augment", "weak_prob"),
    "timm_auto_augment_par": ("augment", "rand_augment"),
    "re_prob": ("augment", "erasing_prob"),
    "epochs": ("optim", "epochs"),
    "lr": ("optim", "lr"),
    "min_lr": ("optim", "min_lr"),
    "warmup_epochs": ("optim", "warmup_epochs"),
    "weight_decay": ("optim", "weight_decay"),
    "weight_decay_end": ("optim", "weight_decay_end"),
    "momentum_teacher": ("optim", "momentum_teacher"),
    "clip_grad": ("optim", "clip_grad"),
    "patch_embed_lr_mult": ("optim", "patch_embed_lr_mult"),
    "freeze_last_layer": ("optim", "freeze_last_layer"),
    "seed": ("train", "seed"),
}

# our key -> (where it came from in the official file, tensor)
_Mapped = dict[str, tuple[str, Tensor]]


def _load_official(path: Path, trust_pickle: bool) -> dict[str, Any]:
    try:
        payload = _read_torch_file(
            path,
            trust_pickle=trust_pickle,
            foreign_hint="Pass --trust-pickle (trust_pickle=True) only if you trust the file's source.",
        )
    except CheckpointError as error:
        raise OfficialCheckpointError(str(error)) from None
    if not isinstance(payload, dict):
        raise OfficialCheckpointError(f"{path} does not hold a dict, so it is no Mugs checkpoint")
    unknown = sorted(set(payload) - _TOP_LEVEL)
    if unknown:
        raise OfficialCheckpointError(
            f"{path}: unknown top-level entries {unknown} (a Mugs checkpoint has these: "
            f"{', '.join(sorted(_TOP_LEVEL))})"
        )
    for key in ("student", "teacher", "epoch"):
        if key not in payload:
            raise OfficialCheckpointError(f"{path}: missing top-level entry {key!r}")
    return payload


def _strip_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key.removeprefix("module."): value for key, value in state.items()}


def _require(state: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in state:
        raise OfficialCheckpointError(f"{where}: missing {key!r}")
    return state[key]


def _projector_dims(state: dict[str, Tensor], head: str, where: str) -> tuple[int, int, bool]:
    """(hidden width, output width, BatchNorm?) of a three-layer projector: Linears at 0,2,4 or 0,3,6."""
    use_bn = f"{head}.projector.1.running_mean" in state
    first, last = (0, 6) if use_bn else (0, 4)
    hidden = _require(state, f"{head}.projector.{first}.weight", where).shape[0]
    out = _require(state, f"{head}.projector.{last}.weight", where).shape[0]
    return hidden, out, use_bn


def _infer_structure(teacher: dict[str, Tensor], student: dict[str, Tensor], payload: dict[str, Any]) -> dict:
    """Config values that the tensor shapes determine: arch, patch and image size, head widths, queues."""
    pos_embed = _require(teacher, "backbone.pos_embed", "teacher")
    patch_weight = _require(teacher, "backbone.patch_embed.proj.weight", "teacher")
    embed_dim, patch_size = pos_embed.shape[-1], patch_weight.shape[-1]
    depth = len({m.group(1) for k in teacher if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))})
    arch = next((name for name, (d, n, _) in VIT_SIZES.items() if (d, n) == (embed_dim, depth)), None)
    if arch is None:
        raise OfficialCheckpointError(f"no known ViT has embed dim {embed_dim} and depth {depth}")
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1:
        raise OfficialCheckpointError(f"position table of {pos_embed.shape[1] - 1} patches is not square")

    heads = {
        name: f"{name}_head.projector.0.weight" in teacher for name in ("instance", "local_group", "group")
    }
    if not any(heads.values()):
        raise OfficialCheckpointError("teacher has no instance, local-group or group head")
    dims = {
        name: _projector_dims(teacher, f"{name}_head", "teacher")
        for name, present in heads.items()
        if present
    }
    if heads["group"]:
        direction = _require(teacher, "group_head.last_layer.weight_v", "teacher")
        group_out_dim = direction.shape[0]
        # the group head's bottleneck is the third Linear's width, which our config ties to out_dim
        dims["group"] = (dims["group"][0], direction.shape[1], dims["group"][2])
    if len(set(dims.values())) > 1:
        raise OfficialCheckpointError(
            f"heads differ in (hidden, out, BatchNorm) {dims}; "
            "our config has one hidden_dim and out_dim for all heads"
        )
    hidden_dim, out_dim, use_bn = next(iter(dims.values()))
    model: dict[str, Any] = {
        "arch": arch,
        "patch_size": patch_size,
        "hidden_dim": hidden_dim,
        "out_dim": out_dim,
        "use_bn_in_head": use_bn,
    }
    if heads["group"]:
        model["group_out_dim"] = group_out_dim
    predictor = next((f"{n}_head.predictor.0.weight" for n in ("instance", "local_group") if heads[n]), None)
    if predictor is not None:
        model["predictor_hidden_dim"] = _require(student, predictor, "student").shape[0]

    loss: dict[str, Any] = {f"{name}_weight": 0.0 for name, present in heads.items() if not present}
    if heads["instance"]:
        loss["instance_queue_size"] = _require(
            payload.get("instance-sup.") or {}, "queue", "instance-sup."
        ).shape[1]
    if heads["local_group"]:
        memory = payload.get("teacher_mem") or {}
        memory_size = _require(memory, "block.queue_q", "teacher_mem").shape[0]
        queue_size = _require(payload.get("local-group-sup.") or {}, "queue", "local-group-sup.").shape[1]
        if queue_size != memory_size:
            raise OfficialCheckpointError(
                f"local-group queue ({queue_size}) and memory ({memory_size}) differ in size; "
                "our config has one local_group_queue_size for both"
            )
        loss["local_group_queue_size"] = memory_size
    return {"model": model, "loss": loss, "augment": {"global_size": grid * patch_size}}


def _config_from_args(values: dict[str, Any], heads_present: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Hyper-parameters the shapes cannot tell, from the pickled argparse ``args`` of a trusted file."""
    sections: dict[str, dict[str, Any]] = {}
    for name, (section, key) in _ARGS_TO_CONFIG.items():
        if name in values:
            value = values[name]
            sections.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    if "size_crops" in values:
        sections.setdefault("augment", {})["local_size"] = int(values["size_crops"][0])
    if "batch_size_per_gpu" in values:
        world = int(values.get("world_size", 1))
        sections.setdefault("optim", {})["batch_size"] = int(values["batch_size_per_gpu"]) * world
    if values.get("use_fp16"):
        sections.setdefault("optim", {})["precision"] = "fp16"
    if "loss_weights" in values:
        names = ("instance", "local_group", "group")
        for name, weight in zip(names, values["loss_weights"], strict=True):
            if heads_present[name]:
                sections.setdefault("loss", {})[f"{name}_weight"] = float(weight)
    return sections


def _choose_preset(arch: str, epoch: int) -> str | None:
    """The published preset of ``arch`` (named ``{arch}_{epochs}ep``) with ``epoch`` epochs, else the
    shortest one."""
    published = [name for name in PRESETS if name.startswith(f"{arch}_")]
    epochs = {name: config_from_dict({"preset": name}).optim.epochs for name in published}
    by_epochs = [name for name, count in epochs.items() if count == epoch]
    return (by_epochs or sorted(epochs, key=epochs.__getitem__) or [None])[0]


def _build_config(
    payload: dict[str, Any],
    teacher: dict[str, Tensor],
    student: dict[str, Tensor],
    args: Any,
    arch: str | None,
) -> Config:
    structure = _infer_structure(teacher, student, payload)
    inferred_arch = structure["model"]["arch"]
    if arch is not None and arch != inferred_arch:
        raise OfficialCheckpointError(f"--arch {arch} given, but the weights are a {inferred_arch}")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if args is not None and args.get("arch", inferred_arch) != inferred_arch:
        raise OfficialCheckpointError(f"args.arch is {args['arch']!r}, but the weights are a {inferred_arch}")
    heads = {
        name: structure["loss"].get(f"{name}_weight", 1.0) > 0
        for name in ("instance", "local_group", "group")
    }

    sections: dict[str, dict[str, Any]] = {"optim": {}}
    if "fp16_scaler" in payload:
        sections["optim"]["precision"] = "fp16"
    if heads["group"]:
        # frozen gains stay exactly 1 (norm_last_layer); trained ones move
        gain = _require(teacher, "group_head.last_layer.weight_g", "teacher")
        sections["model"] = {"norm_last_layer": bool(torch.all(gain == 1))}
    layers = [sections]
    if args is not None:
        layers.append(_config_from_args(args, heads))
    layers.append(structure)  # the shapes have the last word
    values: dict[str, Any] = {}
    preset = _choose_preset(inferred_arch, int(payload["epoch"]))
    if preset is not None:
        values["preset"] = preset
    for layer in layers:
        for section, entries in layer.items():
            values.setdefault(section, {}).update(entries)
    return config_from_dict(values)


def _network_state(
    network: dict[str, Tensor], memory: dict[str, Tensor] | None, name: str, *, local_group: bool
) -> _Mapped:
    mapped: _Mapped = {}
    for key, value in network.items():
        ours = _WEIGHT_NORM.get(key.removeprefix("module."), key.removeprefix("module."))
        # the official backbone always has a relation block; ours has one only with the local-group head
        if not local_group and ours.startswith("backbone.relation_blocks."):
            continue
        mapped[ours] = (f"{name}[{key!r}]", value)
    if local_group:
        if memory is None:
            raise OfficialCheckpointError(
                f"missing top-level entry '{name}_mem' (needed by the local-group head)"
            )
        for key, value in memory.items():
            if key not in _UNUSED_MEMORY_BUFFERS:
                mapped[f"memory.{_MEMORY_BUFFERS.get(key, key)}"] = (f"{name}_mem[{key!r}]", value)
    return mapped


def _load_strict(module: nn.Module, mapped: _Mapped, what: str) -> None:
    """Put every entry of ``mapped`` into ``module`` (which may live on the meta device).

    A missing, unknown or misshapen entry is an error naming it.
    """
    expected = module.state_dict()
    unknown = sorted(origin for key, (origin, _) in mapped.items() if key not in expected)
    if unknown:
        raise OfficialCheckpointError(
            f"{what}: entries with no counterpart in our network: {', '.join(unknown)}"
        )
    missing = sorted(key for key in expected if key not in mapped)
    if missing:
        raise OfficialCheckpointError(f"{what}: missing entries for {', '.join(missing)}")
    for key, (origin, value) in mapped.items():
        if value.shape != expected[key].shape:
            raise OfficialCheckpointError(
                f"{origin} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    module.load_state_dict({key: value for key, (_, value) in mapped.items()}, strict=True, assign=True)


@torch.no_grad()
def import_official_checkpoint(
    path: str | Path, out: str | Path, *, trust_pickle: bool = False, arch: str | None = None
) -> Path:
    """Convert an authors' released Mugs checkpoint (METHOD §9) into this project's format at ``out``.

    The file is read with ``weights_only=True``; older releases pickle an argparse ``args`` object,
    and those are only unpickled with ``trust_pickle`` (otherwise an error says so). The model
    configuration comes from the tensor shapes (arch, patch and training image size, head widths,
    queue and memory sizes, which heads exist; BatchNorm in the heads; ``norm_last_layer`` when the
    group gains are all exactly 1), on top of the published preset for that arch (the one whose
    epoch count equals the file's ``epoch`` if any), with the remaining hyper-parameters from
    ``args`` when the file is trusted and has them. ``arch``, when given, must match the weights.

    Mapping: ``student`` (``module.`` stripped) and ``teacher`` keep their names except
    ``group_head.last_layer.weight_{g,v}`` → ``...parametrizations.weight.original{0,1}``; memory
    ``block.queue_q`` → ``memory.search_keys``, ``block.queue_k`` → ``memory.values``,
    ``block.queue_ptr`` → ``memory.pointer``, ``block.queue_v`` dropped (never read); losses
    ``instance-sup.`` / ``local-group-sup.`` ``queue``, ``queue_ptr`` → ``queue``, ``queue_pointer``
    and ``group-sup.`` ``center``. Entries of a disabled supervision (loss weight 0: no head) are
    skipped; the official code still saves its relation block, memories and loss buffers. Everything
    else is loaded strictly: a missing, unknown or misshapen entry is an error naming it.

    The memories are imported as they are: a released memory trained with the official pointer
    stride (METHOD §3) has about half its rows still at their random initialisation, and retrieval
    returns exactly what it returned there. The written config uses our fixed pointer, so further
    training overwrites those rows.

    What the file lacks is stored as ``None``: ``optimizer`` (the official AdamW parameter order
    differs from ours, so continuing training restarts the Adam moments), ``rng``,
    ``iterations_per_epoch``, ``global_iteration`` (the dataset size is unknown here; the trainer
    must derive it as ``epoch × iterations_per_epoch``) and ``world_size``. ``epoch`` is the file's
    count of finished epochs with ``iteration_in_epoch`` 0; ``scaler`` is the file's
    ``fp16_scaler``; ``imported_from`` names the source file. Returns ``out``.
    """
    path, out = Path(path), Path(out)
    check_output(out, [path])
    payload = _load_official(path, trust_pickle)
    student_state = _strip_module(payload["student"])
    teacher_state = _strip_module(payload["teacher"])
    config = _build_config(payload, teacher_state, student_state, payload.get("args"), arch)

    # Every tensor comes from the file, so the networks are built without storage or random init.
    with torch.device("meta"):
        student, teacher = build_networks(config)
        losses = MugsObjective.from_config(config).losses
    local_group = student.memory is not None
    for network, name in ((student, "student"), (teacher, "teacher")):
        mapped = _network_state(payload[name], payload.get(f"{name}_mem"), name, local_group=local_group)
        _load_strict(network, mapped, f"{path} {name}")
    for official_name, ours in _LOSSES.items():
        if ours not in losses:
            continue
        if official_name not in payload:
            raise OfficialCheckpointError(f"{path}: missing top-level entry {official_name!r}")
        mapped = {
            _LOSS_BUFFERS.get(key, key): (f"{official_name}[{key!r}]", value)
            for key, value in payload[official_name].items()
        }
        _load_strict(losses[ours], mapped, f"{path} {official_name}")

    imported = ckpt.training_payload(
        student=student,
        teacher=teacher,
        losses=losses,
        config=config,
        epoch=int(payload["epoch"]),
        scaler=payload.get("fp16_scaler"),
    )
    return ckpt.atomic_save({**imported, "imported_from": str(path)}, out)


def timm_model_name(arch: str, patch_size: int, img_size: int) -> str:
    """A registered timm name for our ``arch``: the exact one if timm has it, else the patch-16 224 px one.

    Pass ``patch_size`` and ``img_size`` to ``timm.create_model`` too; they override the name's.
    """
    exact = f"{arch}_patch{patch_size}_{img_size}"
    return exact if timm.is_model(exact) else f"{arch}_patch16_224"


def export_backbone(
    checkpoint: str | Path, out: str | Path, *, network: Literal["teacher", "student"] = "teacher"
) -> Path:
    """Write the ViT backbone of one of our checkpoints (trained or imported) for stock timm.

    ``out`` is a ``torch.save`` dict that loads with ``weights_only=True``::

        {"state_dict": timm ViT state dict (backbone.* without the relation block),
         "arch": registered timm name (see timm_model_name), "patch_size": int, "img_size": int,
         "embed_dim": int, "network": "teacher" | "student", "epoch": int, "source": str}

    and is used as::

        blob = torch.load(out, weights_only=True)
        model = timm.create_model(blob["arch"], num_classes=0, img_size=blob["img_size"],
                                  patch_size=blob["patch_size"])
        model.load_state_dict(blob["state_dict"])  # strict

    The position table is stored at the training resolution ``img_size``: there the timm model gives
    exactly our features. At other sizes timm resamples it its own way, which differs slightly from
    the DINO-style resampling used in pretraining (METHOD §2).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    check_output(out, [checkpoint])
    payload = read_checkpoint(checkpoint, network)
    state = ckpt.backbone_state(payload, network, relation_block=False, source=checkpoint)
    pos_embed, patch_weight = state["pos_embed"], state["patch_embed.proj.weight"]
    embed_dim, patch_size = pos_embed.shape[-1], patch_weight.shape[-1]
    img_size = math.isqrt(pos_embed.shape[1] - 1) * patch_size
    arch = payload["config"]["model"]["arch"]
    return ckpt.atomic_save(
        {
            "state_dict": state,
            "arch": timm_model_name(arch, patch_size, img_size),
            "patch_size": patch_size,
            "img_size": img_size,
            "embed_dim": embed_dim,
            "network": network,
            "epoch": payload["epoch"],
            "source": str(checkpoint),
        },
        out,
    )
