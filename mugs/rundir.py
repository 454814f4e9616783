"""The run directory's layout: every file name a pretraining run, the launcher, selection, the report
and the workflow's rules use, written once.

A pretraining run directory (``train.output_dir``)::

    config.yaml        the resolved config the run trains with
    log.jsonl          one JSON record per logged iteration and per epoch
    DONE               written last, once every epoch is trained and every kept checkpoint is there
    .lock              held by the run's single writer (mugs.training.run_lock)
    checkpoints/       latest.pt (replaced atomically), epochNNNN.pt (the kept copies, hard links)
    slurm/             the SLURM launcher's job record (job.json), its lock and submitit's folders

In the workflow, run ``R`` trains in ``results/R/pretrain``; its selection (``selection.json``, the
``selected.pt`` link) and evaluation metrics go to ``results/R/eval``, its random-initialisation
baseline to ``results/R/random-init``.

This module imports nothing of the package (the workflow's rules read it too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LATEST",
    "SELECTED",
    "SELECTION",
    "RunDir",
    "WorkflowRun",
    "kept_checkpoint_name",
]

LATEST = "latest.pt"  # the checkpoint a run resumes from, replaced atomically
SELECTED = "selected.pt"  # the chosen checkpoint, a link, in the selection's output directory
SELECTION = "selection.json"  # why it was chosen, beside it
_KEPT = re.compile(r"epoch(\d{4,})\.pt$")


def kept_checkpoint_name(epoch: int) -> str:
    """File name of the copy kept after ``epoch`` epochs (1-based count of finished epochs)."""
    return f"epoch{epoch:04d}.pt"


@dataclass(frozen=True)
class RunDir:
    """The files of one pretraining run directory (see the module's docstring)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def slurm(self) -> Path:
        """The SLURM launcher's folder: submitit writes each job's folder under it."""
        return self.root / "slurm"

    @property
    def slurm_record(self) -> Path:
        """The recorded job, to reattach to it."""
        return self.slurm / "job.json"

    @property
    def launch_lock(self) -> Path:
        """Held while a launcher decides whether to submit."""
        return self.slurm / "launch.lock"

    @property
    def selected(self) -> Path:
        """Where ``mugs select`` publishes its choice when given no other output directory."""
        return self.root / SELECTED

    @property
    def eval(self) -> Path:
        """Where ``mugs report`` looks for a run's metrics files when given no other directory."""
        return self.root / "eval"

    def kept(self, epoch: int) -> Path:
        """The copy of ``latest.pt`` kept after ``epoch`` finished epochs."""
        return self.checkpoints / kept_checkpoint_name(epoch)

    def kept_checkpoints(self) -> list[tuple[int, Path]]:
        """The kept copies as ``(epoch, path)``, oldest first."""
        found = []
        for path in self.checkpoints.glob("epoch*.pt"):
            match = _KEPT.search(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)


@dataclass(frozen=True)
class WorkflowRun:
    """The workflow's directories of run ``name`` under ``results/`` (``name`` may be the rules'
    ``{run}`` wildcard)."""

    name: str

    @property
    def results(self) -> Path:
        return Path("results") / self.name

    @property
    def pretrain(self) -> RunDir:
        return RunDir(self.results / "pretrain")

    @property
    def eval(self) -> Path:
        """The selection and the evaluations of the selected checkpoint."""
        return self.results / "eval"

    @property
    def random_init(self) -> Path:
        """The baseline of the run's networks at their random initialisation."""
        return self.results / "random-init"

    def evaluated(self, kind: str) -> Path:
        """The directory of an evaluated checkpoint: ``eval`` or ``random-init`` (or a wildcard)."""
        return self.results / kind
