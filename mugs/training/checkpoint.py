"""Checkpoint files: their format, their atomic save, and the keep-every-N policy.

Every checkpoint this project writes loads with ``torch.load(..., weights_only=True)``: it holds
only tensors, numbers, strings, lists, tuples and dicts (the config as a plain dict, RNG states as
tensors and lists), never pickled objects.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mugs import distributed
from mugs.config import Config, ConfigError, config_from_dict
from mugs.files import atomic_write, publish_link
from mugs.result_keys import depends_on, flatten, pretraining_keys
from mugs.rundir import RunDir, kept_checkpoint_name

FORMAT = "mugs-pipeline/1"


class MissingCheckpointError(RuntimeError):
    """A checkpoint that the keep policy names is gone and cannot be rebuilt from ``latest.pt``."""


def atomic_save(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``payload`` to ``path`` so that readers see either the old file or the complete
    new one (:func:`mugs.files.atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this project (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt or foreign files
        raise ValueError(
            f"{path} is not a checkpoint written by mugs-pipeline ({error}); "
            "for the authors' released files use `mugs import-official`"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mugs-pipeline checkpoint (format {FORMAT!r} expected)")
    return payload


def training_payload(
    *,
    student: nn.Module,
    teacher: nn.Module,
    losses: Mapping[str, nn.Module],
    config: Config,
    epoch: int,
    optimizer: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    start_epoch: int = 0,
    iteration_in_epoch: int = 0,
    global_iteration: int | None = None,
    iterations_per_epoch: int | None = None,
    world_size: int | None = None,
    rng: list[dict[str, Any]] | None = None,
    log_window: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The contents of a pretraining checkpoint, as the trainer writes and :func:`load_checkpoint` reads
    them: the networks', losses' (by name), optimizer's and scaler's states, where the run stands (in
    finished epochs and iterations), every rank's RNG states and log window (the losses since the last log
    line) and the config as a plain dict. What the
    writer does not know (an imported file has no optimizer, data size or RNG states) is ``None``.
    """
    return {
        "format": FORMAT,
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "losses": {name: loss.state_dict() for name, loss in losses.items()},
        "optimizer": optimizer,
        "scaler": scaler,
        "epoch": epoch,
        "start_epoch": start_epoch,
        "iteration_in_epoch": iteration_in_epoch,
        "global_iteration": global_iteration,
        "iterations_per_epoch": iterations_per_epoch,
        "world_size": world_size,
        "rng": rng,
        "log_window": log_window,
        "config": config.to_dict(),
    }


def load_weights(
    payload: dict[str, Any],
    path: Path,
    student: nn.Module,
    teacher: nn.Module,
    losses: Mapping[str, nn.Module],
) -> None:
    """Load a checkpoint's networks and losses (strictly); a mismatch is a ``ValueError`` naming ``path``."""
    try:
        student.load_state_dict(payload["student"])
        teacher.load_state_dict(payload["teacher"])
        for name, loss in losses.items():
            loss.load_state_dict(payload["losses"][name])
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{path} does not fit this run's model and loss settings: {error}") from None


def trained_config(payload: dict[str, Any], source: str | Path = "the checkpoint") -> Config:
    """The validated config a checkpoint was trained with; an invalid one is a ``ConfigError`` naming
    ``source``."""
    try:
        return config_from_dict(payload["config"])
    except ConfigError as error:
        raise ConfigError(f"{source}: its recorded config is invalid: {error}") from None


def backbone_state(
    payload: dict[str, Any],
    network: str,
    *,
    relation_block: bool = True,
    source: str | Path = "the checkpoint",
) -> dict[str, Tensor]:
    """The ViT backbone weights of ``payload[network]`` under timm's names (``backbone.`` stripped);
    ``relation_block=False`` leaves out the local-group relation block, which a stock ViT lacks."""
    state = payload.get(network)
    if not isinstance(state, dict):
        raise ValueError(f"{source} has no {network!r} network (keys: {', '.join(sorted(payload))})")
    left_out = () if relation_block else ("backbone.relation_blocks.",)
    backbone = {
        name.removeprefix("backbone."): value
        for name, value in state.items()
        if name.startswith("backbone.") and not name.startswith(left_out)
    }
    if not backbone:
        raise ValueError(f"{source}: its {network!r} network holds no backbone.* weights")
    return backbone


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one (those
    :func:`mugs.result_keys.pretraining_keys` names; the evaluation, fine-tuning, launch and
    bookkeeping settings can change between a run and its resumption).

    A key that one side lacks counts as its schema default: a checkpoint written before a key was
    added to the schema resumes under the default value, which is what that run trained with.
    """
    defaults = flatten(Config().to_dict())
    old, new = {**defaults, **flatten(saved)}, {**defaults, **flatten(current)}
    dependent = pretraining_keys()
    return sorted(
        key for key in old.keys() | new.keys() if old.get(key) != new.get(key) and depends_on(key, dependent)
    )


def check_resumable(payload: dict[str, Any], config: Config, iterations_per_epoch: int, path: Path) -> None:
    """Refuse (``ValueError`` naming ``path``) to resume from a run's own checkpoint when going on
    would not reproduce the uninterrupted run: other result settings, or another data size."""
    changed = incompatible_keys(payload["config"], config.to_dict())
    if changed:
        raise ValueError(
            f"{path} was written with a different configuration ({', '.join(changed)}); "
            "resuming would not reproduce an uninterrupted run. Use a new train.output_dir."
        )
    if payload["iterations_per_epoch"] != iterations_per_epoch:
        raise ValueError(
            f"{path}: {payload['iterations_per_epoch']} iterations per epoch, "
            f"now {iterations_per_epoch} (did the dataset change?)"
        )


def keep_checkpoint(run: RunDir, epoch: int) -> Path:
    """Keep the current ``latest.pt`` as the copy for ``epoch`` (a hard link: no second write)."""
    return publish_link(run.latest, run.kept(epoch))


def kept_epochs(finished: Iterable[int], total_epochs: int, keep_every: int) -> list[int]:
    """Those of the ``finished`` epoch counts whose checkpoint the keep policy keeps."""
    return [epoch for epoch in finished if should_keep(epoch, total_epochs, keep_every)]


def check_kept_checkpoints(run: RunDir, epochs: Iterable[int]) -> None:
    """Raise :class:`MissingCheckpointError` unless the kept copies of ``epochs`` are all in ``run``."""
    missing = [kept_checkpoint_name(epoch) for epoch in epochs if not run.kept(epoch).exists()]
    if missing:
        raise MissingCheckpointError(
            f"{run.checkpoints}: the kept checkpoints {', '.join(missing)} are missing and "
            f"{run.latest.name} has moved past them, so they cannot be rebuilt; DONE is not written. "
            "Restore them from a copy, or retrain in a new train.output_dir"
        )


def should_keep(finished_epochs: int, total_epochs: int, keep_every: int) -> bool:
    """Keep every ``keep_every``-th epoch and always the last one (``keep_every`` 0 keeps only the last)."""
    if finished_epochs == total_epochs:
        return True
    return keep_every > 0 and finished_epochs % keep_every == 0


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states of this process, as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, in rank order (a collective: every rank calls it)."""
    return distributed.all_gather_objects(capture_rng_state())


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rank_rng_state(states: list[dict[str, Any]], path: Path) -> None:
    """Restore this rank's RNG states from a checkpoint's ``rng`` list (one entry per rank); written
    by another number of ranks, rank ``r`` takes entry ``r mod n``, with a warning."""
    if len(states) != distributed.world_size():
        warnings.warn(
            f"{path} was written by {len(states)} ranks, this run has {distributed.world_size()}: "
            "drop-path randomness will differ from an uninterrupted run",
            stacklevel=2,
        )
    restore_rng_state(states[distributed.rank() % len(states)])
