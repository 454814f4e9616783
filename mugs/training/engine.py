"""The Mugs pretraining engine: one process (CPU) or one rank of a ``torch.distributed`` job.

The launcher hands it a ready process group (or none) and a stop flag; the engine knows nothing of
SLURM.  :meth:`Trainer.train_step` is one iteration of METHOD §1, top to bottom; :meth:`Trainer.fit`
resumes or starts, iterates, and after each iteration logs, stops or checkpoints.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mugs import distributed
from mugs.config import Config
from mugs.data.loader import GlobalBatchSampler, build_loader
from mugs.data.transforms import CropFinisher
from mugs.losses import build_losses
from mugs.model import build_networks
from mugs.monitoring import collapse_warnings, effective_rank, feature_std, normalised_group_entropy
from mugs.training import checkpoint as ckpt
from mugs.training.ema import ema_update
from mugs.training.log import LogWindow, MetricsLog, NonFiniteWatch, progress_bar
from mugs.training.optim import (
    apply_schedules,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    parameter_groups,
)
from mugs.training.schedules import cosine_schedule

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was written after the last good checkpoint.

    ``iteration`` is the first bad one (0-based, as ``Trainer.global_iteration`` before that step),
    ``losses`` its values; ``checked_after`` the number of iterations run when the check found it.
    """

    def __init__(
        self, epoch: int, iteration: int, losses: dict[str, float], checked_after: int | None = None
    ) -> None:
        self.epoch, self.iteration, self.losses = epoch, iteration, losses
        found = f"; found after {checked_after} iterations" if checked_after is not None else ""
        super().__init__(
            f"non-finite loss at global iteration {iteration} (epoch {epoch}): {losses}{found}; "
            "the last good checkpoint is left untouched and no log line follows it"
        )


class CollapseError(RuntimeError):
    """The collapse watch fired with ``train.stop_on_collapse``; the last good checkpoint is kept."""


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
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_dir = self.output_dir / ckpt.DIRECTORY
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
        self._non_finite = NonFiniteWatch(["loss", *self.losses], self.device)

    def _build_networks(self) -> None:
        config = self.config
        # identical initial weights on every rank, then a per-rank stream for drop path
        torch.manual_seed(config.train.seed)
        self.student, self.teacher = build_networks(config)
        self.losses = build_losses(config)
        # every RNG a checkpoint records is seeded, so equal runs write byte-identical files
        rank_seed = config.train.seed + 1 + self.rank
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        for module in (self.student, self.teacher, *self.losses.values()):
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
        self.loss_weights = {
            "instance": config.loss.instance_weight,
            "local_group": config.loss.local_group_weight,
            "group": config.loss.group_weight,
        }

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
        self.finish_crops = CropFinisher(*mean_std, self.device)

    def _build_optimisation(self) -> None:
        optim, per_epoch = self.config.optim, self.iterations_per_epoch
        self.lr_schedule = cosine_schedule(
            optim.lr * optim.batch_size / 256.0,
            optim.min_lr,
            optim.epochs,
            per_epoch,
            warmup_epochs=optim.warmup_epochs,
        )
        self.wd_schedule = cosine_schedule(
            optim.weight_decay, optim.weight_decay_end, optim.epochs, per_epoch
        )
        self.momentum_schedule = cosine_schedule(optim.momentum_teacher, 1.0, optim.epochs, per_epoch)
        assert len(self.lr_schedule) == optim.epochs * per_epoch
        self.optimizer = build_optimizer(
            parameter_groups(self.student, patch_embed_lr_mult=optim.patch_embed_lr_mult)
        )
        use_cuda_amp = self.device.type == "cuda" and optim.precision != "fp32"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(optim.precision)
        self.use_autocast = use_cuda_amp
        self.scaler = torch.amp.GradScaler("cuda") if use_cuda_amp and optim.precision == "fp16" else None
        if optim.precision != "fp32" and self.device.type == "cpu":
            warnings.warn(f"optim.precision={optim.precision} is ignored on CPU (fp32 is used)", stacklevel=3)

    # ------------------------------------------------------------------ one iteration
    def train_step(self, crops: list[torch.Tensor], weak_flags: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Mugs iteration (METHOD §1); returns the losses as 0-d tensors (no host sync)."""
        it, epoch = self.global_iteration, self.epoch
        apply_schedules(self.optimizer, float(self.lr_schedule[it]), float(self.wd_schedule[it]))
        autocast = torch.autocast(self.device.type, self.autocast_dtype, enabled=self.use_autocast)

        with autocast:
            with torch.no_grad():
                teacher_out = self.teacher_forward(crops[:2])
            student_out = self.student_ddp(crops[2:])
        # the losses run in fp32 whatever the forward precision: softmaxes over 65536 prototypes and
        # queues with temperature 0.04-0.2 lose too much in half precision
        pairs = {
            "instance": (student_out.instance, teacher_out.instance),
            "local_group": (student_out.local_group, teacher_out.local_group),
            "group": (student_out.group, teacher_out.group),
        }
        losses = {}
        for name, loss_fn in self.losses.items():
            student_pred, teacher_target = (t.float() for t in pairs[name])
            extra = (epoch,) if name == "group" else ()
            losses[name] = loss_fn(student_pred, teacher_target, *extra)
        total = sum(self.loss_weights[n] * v for n, v in losses.items()) / sum(
            self.loss_weights[n] for n in losses
        )

        self._update_memories(student_out.memory_feature, teacher_out.memory_feature, weak_flags)
        step_losses = {"loss": total.detach(), **{n: v.detach() for n, v in losses.items()}}
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
            clip_gradients_per_tensor(self.student.parameters(), self._clip_value(epoch))
        cancel_last_layer_gradients(self.student, epoch, self.config.optim.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        ema_update(self.teacher, self.student, float(self.momentum_schedule[it]))
        self._last_teacher = teacher_out
        return step_losses

    def _clip_value(self, epoch: int) -> float:
        optim = self.config.optim
        if optim.clip_grad_late_epoch is not None and epoch > optim.clip_grad_late_epoch:
            return optim.clip_grad * optim.clip_grad_late_factor
        return optim.clip_grad

    @torch.no_grad()
    def _update_memories(
        self, student_feature: torch.Tensor, teacher_feature: torch.Tensor, weak: torch.Tensor
    ) -> None:
        """Student memory: weak-flagged first student global crops; teacher memory: all first teacher ones.

        ``weak`` is the loader's flags, on the host: the rows to keep are numbered there, so the device
        never has to report how many there are (``rows[mask]`` on a GPU would wait for it).
        """
        if self.student.memory is None:
            return
        flags = distributed.all_gather_cat(weak, self.host_group)
        keep = flags.nonzero().squeeze(1).to(self.device, non_blocking=True)
        student_rows = distributed.all_gather_cat(student_feature.float())
        self.student.memory.enqueue(student_rows.index_select(0, keep))
        self.teacher.memory.enqueue(distributed.all_gather_cat(teacher_feature.float()))

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` naming the first iteration, over all ranks, with a
        non-finite loss. It reads the device (and gathers over ranks), so it runs only at log
        intervals and before every checkpoint write, the last one included.
        """
        rows = distributed.all_gather_cat(self._non_finite.summary()[None]).tolist()
        bad = [row for row in rows if row[0]]
        if not bad:
            return
        _, iteration, *values = min(bad, key=lambda row: row[1])
        iteration = int(iteration)
        raise NonFiniteLossError(
            iteration // self.iterations_per_epoch,
            iteration,
            dict(zip(self._non_finite.names, values, strict=True)),
            checked_after=self.global_iteration,
        )

    # ------------------------------------------------------------------ monitoring
    @torch.no_grad()
    def collapse_signals(self) -> dict[str, float]:
        """Std of normalised teacher CLS features, normalised group entropy, effective rank."""
        teacher_out = self._last_teacher
        cls = teacher_out.cls.float()
        signals = {"teacher_feature_std": feature_std(cls), "effective_rank": effective_rank(cls)}
        if teacher_out.group is not None and "group" in self.losses:
            probs = self.losses["group"].teacher_probabilities(teacher_out.group.float(), self.epoch)
            signals["group_entropy_ratio"] = normalised_group_entropy(probs)
        return signals

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return ckpt.training_payload(
            student=self.student,
            teacher=self.teacher,
            losses=self.losses,
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
        )

    def save(self) -> Path | None:
        """Write ``latest.pt`` atomically (rank 0); every rank takes part in gathering the RNG states.

        Refuses (:class:`NonFiniteLossError`) once any step since the start had a non-finite loss.
        """
        self.check_finite()
        payload = self.state_dict()
        path = None
        if self.rank == 0:
            path = ckpt.atomic_save(payload, self.checkpoint_dir / ckpt.LATEST)
        distributed.barrier()
        return path

    def load(self, path: Path) -> None:
        """Resume exactly where ``path`` (this run's own checkpoint) left off."""
        payload = ckpt.load_checkpoint(path, map_location="cpu")
        ckpt.check_resumable(payload, self.config, self.iterations_per_epoch, path)
        self._load_weights(payload, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch = payload["epoch"]
        self.start_epoch = payload.get("start_epoch", 0)
        self.iteration_in_epoch = payload["iteration_in_epoch"]
        self.global_iteration = payload["global_iteration"]
        ckpt.restore_rank_rng_state(payload["rng"], path)

    def initialise_from(self, path: Path) -> None:
        """Start a new run from the weights, memories, queues and centre of another checkpoint (for
        example an imported release), at the epoch it had finished; the optimizer starts afresh."""
        payload = ckpt.load_checkpoint(path, map_location="cpu")
        self._load_weights(payload, path)
        self.epoch = self.start_epoch = payload["epoch"]
        self.iteration_in_epoch = 0
        self.global_iteration = self.epoch * self.iterations_per_epoch

    def _load_weights(self, payload: dict[str, Any], path: Path) -> None:
        try:
            self.student.load_state_dict(payload["student"])
            self.teacher.load_state_dict(payload["teacher"])
            for name, loss in self.losses.items():
                loss.load_state_dict(payload["losses"][name])
        except (RuntimeError, KeyError) as error:
            raise ValueError(f"{path} does not fit this run's model and loss settings: {error}") from None

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
        bar = progress_bar(enabled=progress and self.rank == 0)
        with bar:
            interrupted = self._iterate(end, log, stop_requested, bar)
        return self._finish(interrupted=interrupted, trained=True)

    def _resume_or_start(self) -> MetricsLog:
        """Resume from this run's ``latest.pt``, else start (from ``train.init_from`` if set); the log
        keeps only what the checkpoint has seen."""
        latest = self.checkpoint_dir / ckpt.LATEST
        resumed = latest.exists()
        if resumed:
            self.load(latest)
        elif self.config.train.init_from:
            self.initialise_from(Path(self.config.train.init_from))
        log = MetricsLog(self.output_dir / "log.jsonl", enabled=self.rank == 0)
        log.truncate_after(self.global_iteration)
        if resumed and self.iteration_in_epoch == 0 and self.epoch > self.start_epoch:
            # the run may have died between its epoch-end checkpoint and what follows it
            self._close_epoch(log)
        return log

    def _iterate(self, end: int, log: MetricsLog, stop_requested: Callable[[], bool], bar: Progress) -> bool:
        """Train up to global iteration ``end``; True when stopped early by ``stop_requested``."""
        task = bar.add_task("pretrain", total=end, completed=self.global_iteration)
        while self.global_iteration < end:
            self.sampler.set_position(self.epoch, self.iteration_in_epoch)
            window = LogWindow()
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
                self.save()
                self._close_epoch(log)
        return False

    def _after_iteration(
        self,
        window: LogWindow,
        log: MetricsLog,
        bar: Progress,
        task: TaskID,
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
        latest = self.checkpoint_dir / ckpt.LATEST
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
        finished = range(self.start_epoch + 1, self.epoch + 1)
        return [e for e in finished if ckpt.should_keep(e, epochs, keep_every)]

    def _close_epoch(self, log: MetricsLog) -> None:
        """What follows an epoch-end checkpoint (rank 0): the epoch's log line and, if the policy keeps
        it, the kept copy. Each is done only if missing, so a restart completes a killed run's."""
        if self.rank != 0:
            return
        if not log.has_epoch(self.epoch):
            log.write({"type": "epoch", "epoch": self.epoch, "global_iteration": self.global_iteration})
        kept = self.checkpoint_dir / ckpt.kept_checkpoint_name(self.epoch)
        if self.epoch in self._kept_epochs() and not kept.exists():
            ckpt.keep_checkpoint(self.checkpoint_dir, self.epoch)

    def _mark_done(self) -> None:
        """Write the ``DONE`` marker the workflow waits for (rank 0), once every kept checkpoint is there."""
        if self.rank != 0:
            return
        missing = [
            name
            for name in map(ckpt.kept_checkpoint_name, self._kept_epochs())
            if not (self.checkpoint_dir / name).exists()
        ]
        if missing:
            raise ckpt.MissingCheckpointError(
                f"{self.checkpoint_dir}: the kept checkpoints {', '.join(missing)} are missing and "
                f"{ckpt.LATEST} has moved past them, so they cannot be rebuilt; DONE is not written. "
                "Restore them from a copy, or retrain in a new train.output_dir"
            )
        ckpt.atomic_write_text(
            self.output_dir / "DONE", json.dumps({"global_iteration": self.global_iteration}) + "\n"
        )

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
            **self.collapse_signals(),
        }
        if "group" in self.losses:
            record["teacher_temperature"] = self.losses["group"].teacher_temperature(self.epoch)
        record["warnings"] = collapse_warnings(
            record["teacher_feature_std"],
            record.get("group_entropy_ratio"),
            record["effective_rank"],
            dim=self.student.backbone.embed_dim,
            n_samples=self._last_teacher.cls.shape[0],
        )
        log.write(record)
        window.reset()
        for message in record["warnings"]:
            if self.rank == 0:
                warnings.warn(f"collapse watch at iteration {self.global_iteration}: {message}", stacklevel=2)
        if record["warnings"] and self.config.train.stop_on_collapse:
            raise CollapseError(
                f"collapse detected at global iteration {self.global_iteration}: "
                f"{'; '.join(record['warnings'])}"
                "; the last good checkpoint is kept"
            )
        return record


__all__ = ["CollapseError", "NonFiniteLossError", "TrainResult", "Trainer"]
