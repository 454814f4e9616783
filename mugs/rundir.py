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
from pathlib import Path

__all__ = [
    "LATEST",
    "SELECTED",
    "SELECTION",
    "RunDir",
    "WorkflowRun",
    "job_dir",
    "kept_checkpoint_name",
]

LATEST = "latest.pt"  # the checkpoint a run resumes from, replaced atomically
SELECTED = "selected.pt"  # the chosen checkpoint, a link, in the selection's output directory
SELECTION = "selection.json"  # why it was chosen, beside it
_KEPT = re.compile(r"epoch(\d{4,})\.pt$")


def kept_checkpoint_name(epoch: int) -> str:
    """File name of the copy kept after ``epoch`` epochs (1-based count of finished epochs)."""
    return f"epoch{epoch:04d}.pt"


def job_dir(out: str | Path) -> Path:
    """The run directory (lock, ``checkpoints/latest.pt``, ``slurm/``) of the long job whose result is
    the file ``out``: ``results/R/eval/finetune.json`` → ``results/R/eval/finetune``."""
    return Path(out).with_suffix("")


class RunDir:
    """The files of one pretraining run directory (see the module's docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.log = self.root / "log.jsonl"
        self.done = self.root / "DONE"
        self.lock = self.root / ".lock"
        self.checkpoints = self.root / "checkpoints"
        self.latest = self.checkpoints / LATEST
        # the SLURM launcher's folder (submitit writes each job's folder under it), its record of the
        # job to reattach to, and the lock held while a launcher decides whether to submit
        self.slurm = self.root / "slurm"
        self.slurm_record = self.slurm / "job.json"
        self.launch_lock = self.slurm / "launch.lock"
        # where `mugs select` publishes its choice, and `mugs report` looks for metrics files, when
        # given no other directory
        self.selected = self.root / SELECTED
        self.eval = self.root / "eval"

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


class WorkflowRun:
    """The workflow's paths of run ``name`` under ``results/`` (``name`` may be the rules' ``{run}``
    wildcard)."""

    def __init__(self, name: str) -> None:
        self.results = Path("results") / name
        self.pretrain_dir = self.results / "pretrain"  # the run's train.output_dir
        self.done = RunDir(self.pretrain_dir).done
        # the selection and the evaluations of the selected checkpoint
        self.eval = self.results / "eval"
        self.selection = self.eval / SELECTION
        self.selected = self.eval / SELECTED
        # the baseline of the run's networks at their random initialisation
        self.random_init = self.results / "random-init"
        self.random_init_checkpoint = self.random_init / "checkpoint.pt"

    def metrics(self, protocol: str, kind: str = "eval") -> Path:
        """The metrics file of ``protocol`` (knn, linear, ...) for the checkpoint ``kind`` evaluates:
        ``eval`` (the selected one) or ``random-init`` (or the rules' ``{evaluated}`` wildcard)."""
        return self.results / kind / f"{protocol}.json"
