"""The kinds of long job the launchers run: what every rank runs, and where the job keeps its state.

The local launcher (:func:`mugs.launch.local.launch_local`) and the SLURM one
(:func:`mugs.launch.slurm.launch_slurm`) give every kind the same service: N ranks in one process
group, the run directory's lock (one writer), a stop flag raised by SIGTERM/SIGINT or SLURM's signal,
then a checkpoint and (on SLURM) a requeue, reattachment instead of a second submission. A kind
brings the rest, as a small picklable object (it travels to spawned ranks and into submitit's
pickle):

- ``kind``: its name; ``launch.jobs[kind]`` holds its own SLURM resources (``config.for_job``);
- ``run_dir(config)``: the directory it locks and keeps ``checkpoints/latest.pt`` and ``slurm/`` in;
- ``check(config, world_size)``: a refusal (``ValueError``) before any rank starts;
- ``absolute()``: itself with its paths absolute, for a job that starts elsewhere;
- ``__call__(config, stop_requested=, progress=, locked=)``: one rank's run, resuming from its own
  checkpoint; it polls ``stop_requested`` after every iteration and returns a
  :class:`~mugs.training.engine.TrainResult` (``interrupted`` once it has checkpointed on a stop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from torch.utils.data import Dataset

from mugs.config import Config
from mugs.evaluation.finetune import run_finetune
from mugs.rundir import job_dir
from mugs.training.engine import TrainResult
from mugs.training.pretrain import run_pretraining


class LongJob(Protocol):
    kind: ClassVar[str]

    def run_dir(self, config: Config) -> Path: ...

    def check(self, config: Config, world_size: int) -> None: ...

    def absolute(self) -> LongJob: ...

    def __call__(
        self, config: Config, *, stop_requested: Callable[[], bool], progress: bool, locked: bool
    ) -> TrainResult: ...


@dataclass(frozen=True)
class Pretraining:
    """Mugs pretraining in ``train.output_dir``; ``dataset`` (with its ``mean_std``) bypasses the
    prepared manifest (tests, benchmarks)."""

    dataset: Dataset | None = None
    mean_std: tuple | None = None
    kind: ClassVar[str] = "pretrain"

    def run_dir(self, config: Config) -> Path:
        return Path(config.train.output_dir)

    def check(self, config: Config, world_size: int) -> None:
        if config.optim.batch_size % world_size:
            raise ValueError(
                f"optim.batch_size={config.optim.batch_size} is not divisible by {world_size} processes"
            )

    def absolute(self) -> Pretraining:
        return self  # the config's paths are made absolute with it

    def __call__(
        self, config: Config, *, stop_requested: Callable[[], bool], progress: bool, locked: bool
    ) -> TrainResult:
        return run_pretraining(
            config,
            dataset=self.dataset,
            mean_std=self.mean_std,
            stop_requested=stop_requested,
            progress=progress,
            locked=locked,
        )


@dataclass(frozen=True)
class Finetuning:
    """Fine-tuning ``checkpoint``'s backbone; the metrics go to ``out``, the run's state to
    ``job_dir(out)``."""

    checkpoint: str
    out: str
    kind: ClassVar[str] = "finetune"

    def run_dir(self, config: Config) -> Path:
        return job_dir(self.out)

    def check(self, config: Config, world_size: int) -> None:
        if not Path(self.checkpoint).is_file():
            raise ValueError(f"checkpoint {self.checkpoint} does not exist")

    def absolute(self) -> Finetuning:
        return Finetuning(str(Path(self.checkpoint).absolute()), str(Path(self.out).absolute()))

    def __call__(
        self, config: Config, *, stop_requested: Callable[[], bool], progress: bool, locked: bool
    ) -> TrainResult:
        return run_finetune(
            self.checkpoint, config, self.out, stop_requested=stop_requested, progress=progress, locked=locked
        )
