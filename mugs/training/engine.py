"""The Mugs pretraining engine: one process (CPU) or one rank of a ``torch.distributed`` job.

The launcher hands it a ready process group (or none) and a stop flag; the engine knows nothing of
SLURM.  :meth:`Trainer.train_step` is one iteration of METHOD §1, top to bottom.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

# rich draws from Python's global RNG when first imported: at import time, before any seeding, so
# that the draw can never fall between restoring a checkpoint's RNG states and the next step
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mugs import distributed
from mugs.config import Config
from mugs.data.loader import GlobalBatchSampler, SeededAugmentedDataset, ignore_stop_signals
from mugs.data.transforms import CropFinisher, MultiCropAugmentation, collate_multicrop
from mugs.losses import GroupLoss, InfoNCEQueueLoss
from mugs.model import MugsNetwork, create_mugs_network
from mugs.monitoring import collapse_warnings, effective_rank, feature_std, normalised_group_entropy
from mugs.training import checkpoint as ckpt
from mugs.training.ema import ema_update
from mugs.training.optim import (
    apply_schedules,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    parameter_groups,
)
from mugs.training.schedules import cosine_schedule


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


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(choice)


def build_networks(config: Config) -> tuple[MugsNetwork, MugsNetwork]:
    """Student and teacher; the teacher starts from the student's parameters (not its memory)."""
    model, loss = config.model, config.loss
    common = dict(
        patch_size=model.patch_size,
        img_size=config.augment.global_size,
        instance=loss.instance_weight > 0,
        local_group=loss.local_group_weight > 0,
        group=loss.group_weight > 0,
        hidden_dim=model.hidden_dim,
        out_dim=model.out_dim,
        predictor_hidden_dim=model.predictor_hidden_dim,
        group_out_dim=model.group_out_dim,
        use_bn_in_head=model.use_bn_in_head,
        norm_last_layer=model.norm_last_layer,
        norm_before_pred=model.norm_before_pred,
        memory_size=loss.local_group_queue_size,
        top_n=loss.local_group_knn_top_n,
        memory_pointer=loss.memory_pointer,
        depth=model.depth,
    )
    student = create_mugs_network(model.arch, student=True, drop_path_rate=model.drop_path_rate, **common)
    teacher = create_mugs_network(model.arch, student=False, drop_path_rate=0.0, **common)
    student_parameters = dict(student.named_parameters())
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            parameter.copy_(student_parameters[name])
            parameter.requires_grad_(False)
    return student, teacher


def build_losses(config: Config) -> dict[str, nn.Module]:
    loss, n_crops = config.loss, 2 + config.augment.n_local
    losses: dict[str, nn.Module] = {}
    if loss.instance_weight > 0:
        losses["instance"] = InfoNCEQueueLoss(
            config.model.out_dim, loss.instance_queue_size, loss.instance_temp, n_crops
        )
    if loss.local_group_weight > 0:
        losses["local_group"] = InfoNCEQueueLoss(
            config.model.out_dim, loss.local_group_queue_size, loss.local_group_temp, n_crops
        )
    if loss.group_weight > 0:
        losses["group"] = GroupLoss(
            config.model.group_out_dim,
            n_crops=n_crops,
            warmup_teacher_temp=loss.group_warmup_teacher_temp,
            teacher_temp=loss.group_teacher_temp,
            warmup_teacher_temp_epochs=loss.group_warmup_teacher_temp_epochs,
            epochs=config.optim.epochs,
            student_temp=loss.group_student_temp,
        )
    return losses


def build_transform(config: Config, mean: tuple[float, ...]) -> MultiCropAugmentation:
    """The multi-crop views of a run's images; ``mean`` (the data's) fills what RandAugment uncovers."""
    augment = config.augment
    return MultiCropAugmentation(
        global_size=augment.global_size,
        local_size=augment.local_size,
        n_local=augment.n_local,
        global_scale=augment.global_scale,
        local_scale=augment.local_scale,
        weak_prob=augment.weak_prob,
        mean=mean,
        rand_augment=augment.rand_augment,
        erasing_prob=augment.erasing_prob,
    )


def loader_workers(
    setting: int | str, device: torch.device, host_group: dist.ProcessGroup | None = None
) -> int:
    """``train.num_workers`` as a number. "auto", training on a GPU: an equal share of the cores this
    rank may use with the other ranks on its host (:func:`distributed.ranks_sharing_cores`), less one
    core for the rank itself. Training on the CPU, or with no core to spare: 0, augmenting in the
    training process, since worker processes would compete with the training's own threads.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    share = len(os.sched_getaffinity(0)) // distributed.ranks_sharing_cores(host_group)
    return max(0, share - 1)


def build_loader(
    config: Config,
    dataset: Dataset,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    sampler: GlobalBatchSampler,
    *,
    device: torch.device,
    host_group: dist.ProcessGroup | None = None,
) -> DataLoader:
    """The pretraining input: seeded multi-crop views of ``dataset`` in the sampler's batches, augmented
    by ``train.num_workers`` persistent processes (or in this process when it is 0). Its batches hold
    uint8 crops (``MultiCropBatch``); a ``CropFinisher`` with the same ``mean_std`` finishes them.
    """
    augmented = SeededAugmentedDataset(dataset, build_transform(config, mean_std[0]), config.train.seed)
    workers = loader_workers(config.train.num_workers, device, host_group)
    return DataLoader(
        augmented,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_multicrop,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # each iter() draws its workers' base seed from this generator; without one it would come
        # from the global torch RNG, which drop path also uses and a checkpoint restores, so a
        # resumed run would draw once more than an uninterrupted one and diverge from it
        generator=torch.Generator().manual_seed(config.train.seed),
        worker_init_fn=ignore_stop_signals,
    )


# What a pretraining run's result depends on: every key under these prefixes (the evaluation,
# fine-tuning, launch and bookkeeping settings can change between a run and its resumption).
_RESULT_PREFIXES = ("model.", "loss.", "augment.", "optim.", "data.", "train.seed")
_DATA_LOCATION = frozenset({"data.workers", "data.prepared_dir", "data.root"})


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    old, new = _flatten(saved), _flatten(current)
    return sorted(
        key
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and key.startswith(_RESULT_PREFIXES) and key not in _DATA_LOCATION
    )


class Trainer:
    """Owns the networks, losses, optimizer, schedules and data order of one pretraining run."""

    def __init__(self, config: Config, dataset: Dataset, *, mean_std: tuple[tuple, tuple]) -> None:
        self.config = config
        self.device = resolve_device(config.train.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_dir = self.output_dir / ckpt.DIRECTORY
        if self.device.type == "cpu":
            # denormal floats (tiny softmax tails of sharp teacher distributions) slow CPU kernels
            # several-fold; flushing them to zero is deterministic
            torch.set_flush_denormal(True)
            if config.train.threads:
                torch.set_num_threads(config.train.threads)

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

        self.sampler = GlobalBatchSampler(
            len(dataset),
            config.optim.batch_size,
            seed=config.train.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        # host values (weak flags, the stop flag, loader sizing) travel over gloo, never through the GPU
        self.host_group = distributed.host_group()
        self.loader = build_loader(
            config,
            dataset,
            mean_std,
            self.sampler,
            device=self.device,
            host_group=self.host_group,
        )
        self.finish_crops = CropFinisher(*mean_std, self.device)

        optim = config.optim
        self.iterations_per_epoch = self.sampler.iterations_per_epoch
        total = optim.epochs * self.iterations_per_epoch
        self.lr_schedule = cosine_schedule(
            optim.lr * optim.batch_size / 256.0,
            optim.min_lr,
            optim.epochs,
            self.iterations_per_epoch,
            warmup_epochs=optim.warmup_epochs,
        )
        self.wd_schedule = cosine_schedule(
            optim.weight_decay, optim.weight_decay_end, optim.epochs, self.iterations_per_epoch
        )
        self.momentum_schedule = cosine_schedule(
            optim.momentum_teacher, 1.0, optim.epochs, self.iterations_per_epoch
        )
        assert len(self.lr_schedule) == total
        self.optimizer = build_optimizer(
            parameter_groups(self.student, patch_embed_lr_mult=optim.patch_embed_lr_mult)
        )
        use_cuda_amp = self.device.type == "cuda" and optim.precision != "fp32"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(optim.precision)
        self.use_autocast = use_cuda_amp
        self.scaler = torch.amp.GradScaler("cuda") if use_cuda_amp and optim.precision == "fp16" else None
        if optim.precision != "fp32" and self.device.type == "cpu":
            warnings.warn(f"optim.precision={optim.precision} is ignored on CPU (fp32 is used)", stacklevel=2)

        self.epoch = 0
        self.start_epoch = 0  # where this run began: 0, or the epoch of train.init_from's checkpoint
        self.iteration_in_epoch = 0
        self.global_iteration = 0
        self._last_teacher = None
        self._non_finite = _NonFiniteWatch(["loss", *self.losses], self.device)

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
            rng=self._gather_rng_states(),
        )

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        state = ckpt.capture_rng_state()
        if not distributed.is_distributed():
            return [state]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

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
        changed = incompatible_keys(payload["config"], self.config.to_dict())
        if changed:
            raise ValueError(
                f"{path} was written with a different configuration ({', '.join(changed)}); "
                "resuming would not reproduce an uninterrupted run. Use a new train.output_dir."
            )
        if payload["iterations_per_epoch"] != self.iterations_per_epoch:
            raise ValueError(
                f"{path}: {payload['iterations_per_epoch']} iterations per epoch, "
                f"now {self.iterations_per_epoch} (did the dataset change?)"
            )
        self._load_weights(payload, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch = payload["epoch"]
        self.start_epoch = payload.get("start_epoch", 0)
        self.iteration_in_epoch = payload["iteration_in_epoch"]
        self.global_iteration = payload["global_iteration"]
        states = payload["rng"]
        if len(states) == self.world_size:
            ckpt.restore_rng_state(states[self.rank])
        else:
            warnings.warn(
                f"{path} was written by {len(states)} ranks, this run has {self.world_size}: "
                "drop-path randomness will differ from an uninterrupted run",
                stacklevel=2,
            )
            ckpt.restore_rng_state(states[self.rank % len(states)])

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
        config = self.config
        total_iterations = config.optim.epochs * self.iterations_per_epoch
        end = min(total_iterations, config.train.max_iterations or total_iterations)
        if self.global_iteration >= end:
            if end == total_iterations:
                # a workflow rerun of a finished run (Snakemake deletes the marker first) must get it back
                self._mark_done()
            return TrainResult(
                "finished" if end == total_iterations else "stopped",
                self.global_iteration,
                latest if latest.exists() else None,
            )

        bar = _progress(enabled=progress and self.rank == 0)
        task = bar.add_task("pretrain", total=end, completed=self.global_iteration)
        status: Literal["finished", "stopped", "interrupted"] = "finished"
        with bar:
            while self.global_iteration < end:
                self.sampler.set_position(self.epoch, self.iteration_in_epoch)
                window = _Window()
                for batch in self.loader:
                    window.data_ready()
                    step_losses = self.train_step(self.finish_crops(batch), batch.weak_flags)
                    self.iteration_in_epoch += 1
                    self.global_iteration += 1
                    window.step_done(step_losses, config.optim.batch_size)
                    bar.update(task, completed=self.global_iteration)
                    if self.global_iteration % config.train.log_every == 0:
                        record = self._log_record(window, log)
                        bar.update(
                            task, description=f"pretrain loss {record['loss']:.4f} lr {record['lr']:.2e}"
                        )
                    if self.global_iteration >= end:
                        break
                    if _any_rank(stop_requested(), self.host_group):
                        status = "interrupted"
                        break
                    if (
                        config.train.checkpoint_every
                        and self.global_iteration % config.train.checkpoint_every == 0
                    ):
                        self.save()
                    window.data_wait_start()
                if status == "interrupted":
                    break
                if self.iteration_in_epoch == self.iterations_per_epoch:
                    self.epoch += 1
                    self.iteration_in_epoch = 0
                    self.save()
                    self._close_epoch(log)
        if self.global_iteration < total_iterations and status == "finished":
            status = "stopped"
        # the last step is always followed by a save(), here or at the epoch end just above, and its
        # finiteness check guards DONE as well
        path = self.save() if self.iteration_in_epoch or status != "finished" else latest
        if status == "finished":
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

    def _log_record(self, window: _Window, log: MetricsLog) -> dict[str, Any]:
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


def _any_rank(flag: bool, host_group: torch.distributed.ProcessGroup | None) -> bool:
    """True on every rank when any rank's flag is set, so all ranks stop at the same iteration.

    Asked every iteration, so it goes over the host group: through a GPU it would wait for the device.
    """
    if not distributed.is_distributed():
        return flag
    return bool(distributed.all_reduce_sum(torch.tensor([float(flag)]), host_group).item() > 0)


class _NonFiniteWatch:
    """The first iteration whose losses were not all finite, and those losses, kept on the device.

    :meth:`observe` runs every iteration with ``torch.where`` alone, so it costs no host
    synchronisation; :meth:`Trainer.check_finite` reads :meth:`summary` when a sync is due anyway.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.iteration = torch.zeros((), dtype=torch.long, device=device)
        self.losses = torch.zeros(len(names), device=device)

    def observe(self, iteration: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([losses[name].float() for name in self.names])
        first = ~(self.seen | torch.isfinite(values).all())
        self.iteration = torch.where(first, iteration, self.iteration)
        self.losses = torch.where(first, values, self.losses)
        self.seen = self.seen | first

    def summary(self) -> torch.Tensor:
        """``[seen, iteration, *losses]`` as float64 (exact for any iteration count), to gather over ranks."""
        return torch.cat((torch.stack((self.seen.double(), self.iteration.double())), self.losses.double()))


class _Window:
    """Accumulates losses on device and times between log lines; reads them on the host only at log time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.started = time.perf_counter()
        self.waited = 0.0
        self._wait_from = self.started

    def data_wait_start(self) -> None:
        self._wait_from = time.perf_counter()

    def data_ready(self) -> None:
        self.waited += time.perf_counter() - self._wait_from

    def step_done(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.images += images // max(distributed.world_size(), 1)

    def mean_losses(self) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        stacked = torch.stack([self.sums[n] for n in names]) / self.steps
        stacked = distributed.all_reduce_mean(stacked)
        return dict(zip(names, stacked.tolist(), strict=True))

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def data_wait_fraction(self) -> float:
        return self.waited / max(time.perf_counter() - self.started, 1e-9)


class MetricsLog:
    """JSON lines, one per log interval and per epoch; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` pairs. A torn last line (a crash or a full disk in mid-write) is left out
        with a warning naming the file; an unreadable line before it is an error."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                if number < len(lines):
                    raise ValueError(f"{self.path}, line {number}: not a log record ({error})") from None
                warnings.warn(f"{self.path}: dropped its torn last line {number} ({error})", stacklevel=2)
                continue
            parsed.append((line, record))
        return parsed

    def truncate_after(self, global_iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, r in self.records() if r.get("global_iteration", 0) <= global_iteration]
        ckpt.atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def has_epoch(self, epoch: int) -> bool:
        return any(r.get("type") == "epoch" and r.get("epoch") == epoch for _, r in self.records())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")


def _progress(*, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


__all__ = [
    "CollapseError",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "build_losses",
    "build_networks",
    "incompatible_keys",
    "resolve_device",
]
