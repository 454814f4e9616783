"""Checkpoint files: atomic writes, plain-data contents, and the keep-every-N policy.

Every checkpoint this project writes loads with ``torch.load(..., weights_only=True)``: it holds
only tensors, numbers, strings, lists, tuples and dicts (the config as a plain dict, RNG states as
tensors and lists), never pickled objects.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "mugs-pipeline/1"
LATEST = "latest.pt"
_KEPT = re.compile(r"epoch(\d{4,})\.pt$")


def atomic_save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` so that readers see either the old file or the complete new one.

    The data go to a temporary file in the same directory, are flushed and fsync'ed, and the file is
    renamed over ``path``; the directory is fsync'ed so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


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


def kept_checkpoint_name(epoch: int) -> str:
    """File name of the copy kept after ``epoch`` epochs (1-based count of finished epochs)."""
    return f"epoch{epoch:04d}.pt"


def keep_checkpoint(directory: Path, epoch: int) -> Path:
    """Keep the current ``latest.pt`` as the copy for ``epoch`` (a hard link: no second write)."""
    target = directory / kept_checkpoint_name(epoch)
    temporary = directory / f".{target.name}.link.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(directory / LATEST, temporary)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(directory / LATEST, temporary)
    os.replace(temporary, target)
    return target


def kept_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """The kept copies in ``directory`` as ``(epoch, path)``, oldest first."""
    directory = Path(directory)
    found = []
    for path in directory.glob("epoch*.pt"):
        match = _KEPT.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


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


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
