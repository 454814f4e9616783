"""The Mugs pretraining engine: one process (CPU) or one rank of a ``torch.distributed`` job.

The launcher hands it a ready process group (or none) and a stop flag; the engine knows nothing of
SLURM.  :meth:`Trainer.train_step` is one iteration of METHOD §1, top to bottom; :meth:`Trainer.fit`
resumes or starts, iterates, and after each iteration logs, stops or checkpoints.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from mugs import distributed
from mugs.config import Config
from mugs.data.loader import GlobalBatchSampler, build_finisher, build_loader
from mugs.files import atomic_write_text
from mugs.losses import MugsObjective
from mugs.model import initial_networks, update_memories
from mugs.progress import PlainProgress, progress_display
from mugs.rundir import RunDir
from mugs.training import checkpoint as ckpt
from mugs.training.ema import ema_update
from mugs.training.log import (
    CollapseError,
    LogWindow,
    MetricsLog,
    NonFiniteLossError,
    NonFiniteWatch,
    collapse_alarm,
    collapse_watch,
)
from mugs.training.optim import (
    apply_schedules,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    clip_norm,
    mixed_precision,
    parameter_groups,
)
from mugs.training.schedules import pretraining_schedules

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass
class TrainResult:
    """How a run ended: ``finished``; ``stopped`` at ``train.max_iterations``; ``interrupted`` by the
    stop flag (``stopped_by`` names the signal when a launcher knows it)."""

    status: Literal["finished", "stopped", "interrupted"]
    global_iteration: int
    checkpoint: Path | None
    stopped_by: str | None = None


class Trainer:
    """Owns the networks, losses, optimizer, schedules and data order of one pretraining run."""

    def __init__(self, config: Config, dataset: Dataset, *, mean_std: tuple[tuple, tuple]) -> None:
        self.config = config
        self.device = distributed.resolve_device(config.train.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.run_dir = RunDir(config.train.output_dir)
        if self.device.type == "cpu":
            # denormal floats (tiny softmax tails of sharp teacher distributions) slow CPU kernels
            # several-fold; flushing them to zero is deterministic
            torch.set_flush_denormal(True)
            if config.train.threads:
                torch.set_num_threads(config.train.threads)
        self._build_networks()
        self._build_input(dataset, mean_std)
        self._build_optimisation()
        self.epoch = 0
        self.start_epoch = 0  # where this run began: 0, or the epoch of train.init_from's checkpoint
        self.iteration_in_epoch = 0
        self.global_iteration = 0
        self._last_teacher = None
        self.window = LogWindow()
        self._non_finite = NonFiniteWatch(["loss", *self.objective.losses], self.device)

    def _build_networks(self) -> None:
        config = self.config
        # identical initial weights on every rank, then a per-rank stream for drop path
        self.student, self.teacher = initial_networks(config)
        self.objective = MugsObjective.from_config(config)
        # every RNG a checkpoint records is seeded, so equal runs write byte-identical files
        rank_seed = config.train.seed + 1 + self.rank
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        for module in (self.student, self.teacher, self.objective):
            module.to(self.device)
        self.student_ddp: nn.Module = self.student
        if distributed.is_distributed():
            # the memories are identical on every rank by construction: no need to broadcast them
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.teacher_forward: nn.Module = self.teacher
        if config.train.compile:
            self.student_ddp = torch.compile(self.student_ddp)
            self.teacher_forward = torch.compile(self.teacher)

    def _build_input(self, dataset: Dataset, mean_std: tuple[tuple, tuple]) -> None:
        config = self.config
        self.sampler = GlobalBatchSampler(
            len(dataset),
            config.optim.batch_size,
            seed=config.train.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.iterations_per_epoch = self.sampler.iterations_per_epoch
        # host values (weak flags, the stop flag, loader sizing) travel over gloo, never through the GPU
        self.host_group = distributed.host_group()
        self.loader = build_loader(
            config, dataset, mean_std, self.sampler, device=self.device, host_group=self.host_group
        )
        self.finish_crops = build_finisher(config, mean_std, self.device)

    def _build_optimisation(self) -> None:
        optim, per_epoch = self.config.optim, self.iterations_per_epoch
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = pretraining_schedules(optim, per_epoch)
        self.optimizer = build_optimizer(
            parameter_groups(self.student, patch_embed_lr_mult=optim.patch_embed_lr_mult)
        )
        self.autocast, self.scaler = mixed_precision(optim.precision, self.device)

    # ------------------------------------------------------------------ one iteration
    def train_step(self, crops: list[torch.Tensor], weak_flags: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Mugs iteration (METHOD §1); returns the losses as 0-d tensors (no host sync)."""
        it, epoch = self.global_iteration, self.epoch
        apply_schedules(self.optimizer, float(self.lr_schedule[it]), float(self.wd_schedule[it]))
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher_forward(crops[:2])
            student_out = self.student_ddp(crops[2:])
        total, losses = self.objective(student_out, teacher_out, epoch)

        features = student_out.memory_feature, teacher_out.memory_feature
        update_memories(self.student, self.teacher, *features, weak_flags, self.host_group)
        step_losses = {"loss": total.detach(), **losses}
        # noted on the device; check_finite reads it at log intervals and before every checkpoint, so
        # a bad step still updates the weights in memory, but they never reach the disk or the log
        self._non_finite.observe(it, step_losses)

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        if self.config.optim.clip_grad > 0:
            clip_gradients_per_tensor(self.student.parameters(), clip_norm(self.config.optim, epoch))
        cancel_last_layer_gradients(self.student, epoch, self.config.optim.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        ema_update(self.teacher, self.student, float(self.momentum_schedule[it]))
        self._last_teacher = teacher_out
        return step_losses

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` naming the first iteration, over all ranks, with a
        non-finite loss. It reads the device (and gathers over ranks), so it runs only at log
        intervals and before every checkpoint write, the last one included.
        """
        self._non_finite.check(self.iterations_per_epoch, checked_after=self.global_iteration)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return ckpt.training_payload(
            student=self.student,
            teacher=self.teacher,
            losses=self.objective.losses,
            config=self.config,
            epoch=self.epoch,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            start_epoch=self.start_epoch,
            iteration_in_epoch=self.iteration_in_epoch,
            global_iteration=self.global_iteration,
            iterations_per_epoch=self.iterations_per_epoch,
            world_size=self.world_size,
            rng=ckpt.gather_rng_states(),
            log_window=distributed.all_gather_objects(self.window.state(), self.host_group),
        )

    def save(self) -> Path | None:
        """Write ``latest.pt`` atomically (rank 0); every rank takes part in gathering the RNG states.

        Refuses (:class:`NonFiniteLossError`) once any step since the start had a non-finite loss.
        """
        self.check_finite()
        payload = self.state_dict()
        path = None
        if self.rank == 0:
            path = ckpt.atomic_save(payload, self.run_dir.latest)
        distributed.barrier()
        return path

    def load(self, path: Path) -> None:
        """Resume exactly where ``path`` (this run's own checkpoint) left off."""
        payload = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.check_resumable(payload, self.config, self.iterations_per_epoch, path)
        ckpt.load_weights(payload, path, self.student, self.teacher, self.objective.losses)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch = payload["epoch"]
        self.start_epoch = payload.get("start_epoch", 0)
        self.iteration_in_epoch = payload["iteration_in_epoch"]
        self.global_iteration = payload["global_iteration"]
        ckpt.restore_rank_rng_state(payload["rng"], path)
        windows = payload.get("log_window")  # absent from checkpoints written before it was kept
        if windows is not None and len(windows) == self.world_size:
            self.window.restore(windows[self.rank], self.device)

    def initialise_from(self, path: Path) -> None:
        """Start a new run from the weights, memories, queues and centre of another checkpoint (for
        example an imported release), at the epoch it had finished; the optimizer starts afresh."""
        payload = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.load_weights(payload, path, self.student, self.teacher, self.objective.losses)
        self.epoch = self.start_epoch = payload["epoch"]
        self.iteration_in_epoch = 0
        self.global_iteration = self.epoch * self.iterations_per_epoch

    # ------------------------------------------------------------------ the loop
    def fit(
        self, *, stop_requested: Callable[[], bool] = lambda: False, progress: bool = True
    ) -> TrainResult:
        """Train from the latest checkpoint (if any) to the end, or until stopped; checkpoint on exit."""
        log = self._resume_or_start()
        total = self.config.optim.epochs * self.iterations_per_epoch
        end = min(total, self.config.train.max_iterations or total)
        if self.global_iteration >= end:
            return self._finish(interrupted=False, trained=False)
        bar = progress_display(progress, main_process=self.rank == 0)
        with bar:
            interrupted = self._iterate(end, log, stop_requested, bar)
        return self._finish(interrupted=interrupted, trained=True)

    def _resume_or_start(self) -> MetricsLog:
        """Resume from this run's ``latest.pt``, else start (from ``train.init_from`` if set); the log
        keeps only what the checkpoint has seen. A checkpoint that cannot be resumed is refused before
        anything is written, the run's ``config.yaml`` included."""
        latest = self.run_dir.latest
        resumed = latest.exists()
        if resumed:
            self.load(latest)
        elif self.config.train.init_from:
            self.initialise_from(Path(self.config.train.init_from))
        if self.rank == 0:
            atomic_write_text(self.run_dir.config, yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        log = MetricsLog(self.run_dir.log, enabled=self.rank == 0)
        log.truncate_after(self.global_iteration)
        if resumed and self.iteration_in_epoch == 0 and self.epoch > self.start_epoch:
            # the run may have died between its epoch-end checkpoint and what follows it
            self._close_epoch(log)
        return log

    def _iterate(
        self, end: int, log: MetricsLog, stop_requested: Callable[[], bool], bar: Progress | PlainProgress
    ) -> bool:
        """Train up to global iteration ``end``; True when stopped early by ``stop_requested``."""
        task = bar.add_task("pretrain", total=end, completed=self.global_iteration, unit="iterations")
        window = self.window
        window.restart_clock()
        while self.global_iteration < end:
            self.sampler.set_position(self.epoch, self.iteration_in_epoch)
            for batch in self.loader:
                window.data_ready()
                step_losses = self.train_step(self.finish_crops(batch), batch.weak_flags)
                self.iteration_in_epoch += 1
                self.global_iteration += 1
                window.step_done(step_losses, self.config.optim.batch_size)
                after = self._after_iteration(window, log, bar, task, end, stop_requested)
                if after == "interrupted":
                    return True
                if after == "end":
                    break
                window.data_wait_start()
            if self.iteration_in_epoch == self.iterations_per_epoch:
                self.epoch += 1
                self.iteration_in_epoch = 0
                window.reset()  # a log line averages iterations of one epoch
                self.save()
                self._close_epoch(log)
        return False

    def _after_iteration(
        self,
        window: LogWindow,
        log: MetricsLog,
        bar: Progress | PlainProgress,
        task: int,
        end: int,
        stop_requested: Callable[[], bool],
    ) -> Literal["continue", "end", "interrupted"]:
        """Log at the log interval; then end, stop, or checkpoint at the checkpoint interval."""
        train = self.config.train
        bar.update(task, completed=self.global_iteration)
        if self.global_iteration % train.log_every == 0:
            record = self._log_record(window, log)
            bar.update(task, description=f"pretrain loss {record['loss']:.4f} lr {record['lr']:.2e}")
        if self.global_iteration >= end:
            return "end"
        if distributed.any_rank(stop_requested(), self.host_group):
            return "interrupted"
        if train.checkpoint_every and self.global_iteration % train.checkpoint_every == 0:
            self.save()
        return "continue"

    def _finish(self, *, interrupted: bool, trained: bool) -> TrainResult:
        """The one place that decides how the run ended: ``interrupted`` by the stop flag, else
        ``finished`` once every epoch is trained (``DONE`` is written) or ``stopped`` at
        ``train.max_iterations``. A run that trained ends with a checkpoint of its last step."""
        finished = self.global_iteration >= self.config.optim.epochs * self.iterations_per_epoch
        status = "interrupted" if interrupted else "finished" if finished else "stopped"
        latest = self.run_dir.latest
        if not trained:
            path = latest if latest.exists() else None
        elif self.iteration_in_epoch or status != "finished":
            # its finiteness check guards DONE as well; a finished run's epoch end has just saved
            path = self.save()
        else:
            path = latest
        if status == "finished":
            # also for a workflow rerun of a finished run (Snakemake deletes the marker first)
            self._mark_done()
        return TrainResult(status, self.global_iteration, path)

    def _kept_epochs(self) -> list[int]:
        """The finished-epoch counts whose checkpoint this run keeps, up to now."""
        keep_every, epochs = self.config.train.keep_every_epochs, self.config.optim.epochs
        return ckpt.kept_epochs(range(self.start_epoch + 1, self.epoch + 1), epochs, keep_every)

    def _close_epoch(self, log: MetricsLog) -> None:
        """What follows an epoch-end checkpoint (rank 0): the epoch's log line and, if the policy keeps
        it, the kept copy. Each is done only if missing, so a restart completes a killed run's."""
        if self.rank != 0:
            return
        if not log.has_epoch(self.epoch):
            log.write({"type": "epoch", "epoch": self.epoch, "global_iteration": self.global_iteration})
        kept = self.run_dir.kept(self.epoch)
        if self.epoch in self._kept_epochs() and not kept.exists():
            ckpt.keep_checkpoint(self.run_dir, self.epoch)

    def _mark_done(self) -> None:
        """Write the ``DONE`` marker the workflow waits for (rank 0), once every kept checkpoint is there."""
        if self.rank != 0:
            return
        ckpt.check_kept_checkpoints(self.run_dir, self._kept_epochs())
        atomic_write_text(self.run_dir.done, json.dumps({"global_iteration": self.global_iteration}) + "\n")

    def _log_record(self, window: LogWindow, log: MetricsLog) -> dict[str, Any]:
        self.check_finite()
        means = window.mean_losses()
        it = self.global_iteration - 1
        record: dict[str, Any] = {
            "type": "iteration",
            "epoch": self.epoch,
            "global_iteration": self.global_iteration,
            **means,
            "lr": float(self.lr_schedule[it]),
            "weight_decay": float(self.wd_schedule[it]),
            "teacher_momentum": float(self.momentum_schedule[it]),
            "images_per_second": window.images_per_second() * self.world_size,
            "data_wait_fraction": window.data_wait_fraction(),
            **collapse_watch(
                self._last_teacher,
                self.objective.group_loss,
                self.epoch,
                dim=self.student.backbone.embed_dim,
            ),
        }
        log.write(record)
        window.reset()
        collapse_alarm(
            record["warnings"],
            self.global_iteration,
            announce=self.rank == 0,
            stop=self.config.train.stop_on_collapse,
        )
        return record


__all__ = ["CollapseError", "NonFiniteLossError", "TrainResult", "Trainer"]
