"""End-to-end fine-tuning of a pretrained backbone (METHOD §8), in the BEiT / iBOT recipe.

The backbone (teacher by default) gets a linear head on its normed class token and is trained with
AdamW under layer-wise learning-rate decay, a linear warmup then cosine schedule, stochastic depth,
timm's Mixup/CutMix with label smoothing (soft-target cross-entropy), RandAugment and random
erasing. The epoch with the best validation top-1 is kept and only that model is scored on test,
so the test split never influences a choice.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mugs import distributed
from mugs.config import Config, FinetuneConfig
from mugs.data.loader import GlobalBatchSampler, SeededAugmentedDataset, ignore_stop_signals
from mugs.data.transforms import SeededRandAugment
from mugs.evaluation.features import eval_transform
from mugs.files import file_sha256
from mugs.model.backbone import MugsViT, create_backbone
from mugs.result_keys import RESULT_KEYS, depends_on, flatten
from mugs.rundir import RunDir, job_dir
from mugs.training import checkpoint as ckpt
from mugs.training.checkpoint import FORMAT, backbone_state, load_checkpoint, trained_config
from mugs.training.engine import TrainResult
from mugs.training.optim import apply_schedules, mixed_precision
from mugs.training.pretrain import locked_run_directory
from mugs.training.schedules import cosine_schedule

__all__ = [
    "FineTuner",
    "build_finetune_model",
    "evaluate_classifier",
    "layer_decay_groups",
    "layer_id",
    "run_finetune",
    "train_transform",
]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Everything the tokens pass through before the first block.
_STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")
# timm ViTs exclude these from weight decay, as do BEiT and iBOT fine-tuning.
_NO_DECAY_NAMES = {"cls_token", "reg_token", "pos_embed"}
# RandAugment's absolute translations scale with the crop, as in timm (0.45 × side).
_TRANSLATE_FRACTION = 0.45


def layer_id(name: str, depth: int) -> int:
    """Depth of parameter ``name`` in a ViT of ``depth`` blocks.

    Stem (patch embedding, class token, position table) → 0; ``blocks.i`` → ``i + 1``; everything
    after the last block (final norm, head) → ``depth + 1``.
    """
    if name.startswith(_STEM):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_decay_groups(model: MugsViT, *, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay: ``lr_mult = layer_decay ** (depth + 1 − id)``.

    One group per (layer id, decayed or not); biases, 1-D tensors, the class token and the position
    table get no weight decay. The head (``id = depth + 1``) keeps scale 1 and the stem the smallest
    scale ``layer_decay ** (depth + 1)``. Groups are ordered by layer id, decayed first.
    """
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        index = layer_id(name, depth)
        decayed = not (parameter.ndim == 1 or name.endswith(".bias") or name in _NO_DECAY_NAMES)
        group = groups.setdefault(
            (index, decayed),
            {
                "params": [],
                "names": [],
                "layer_id": index,
                "lr_mult": layer_decay ** (depth + 1 - index),
                "apply_weight_decay": decayed,
                "weight_decay": weight_decay if decayed else 0.0,
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_finetune_model(
    backbone_state: dict[str, Tensor],
    *,
    arch: str,
    patch_size: int,
    img_size: int,
    num_classes: int,
    drop_path_rate: float,
    depth: int | None = None,
) -> MugsViT:
    """A backbone without relation block, loaded from ``backbone_state`` (timm names), with a new head.

    The head starts near zero (trunc-normal, std 2e-5, as in BEiT / MAE) so the first updates do not
    tear up the pretrained features through large random logits.
    """
    model = create_backbone(
        arch,
        patch_size=patch_size,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        relation_block=False,
        depth=depth,
    )
    state = {k: v for k, v in backbone_state.items() if not k.startswith("relation_blocks.")}
    model.load_state_dict(state, strict=True)
    model.reset_classifier(num_classes)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def train_transform(size: int, tune: FinetuneConfig, mean: tuple, std: tuple) -> T.Compose:
    """timm's training recipe: bicubic random resized crop (scale 0.08–1), flip, RandAugment, normalise,
    random erasing with per-pixel noise (no colour jitter when RandAugment is on, as in timm).

    RandAugment is :class:`~mugs.data.transforms.SeededRandAugment`: timm's ops and op choice (with
    replacement), seeded through Python's ``random`` (which the data loader seeds per worker), and safe
    for 0-bit posterize on new Pillow.
    """
    ops: list = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if tune.rand_augment:
        hparams = {
            "translate_const": int(size * _TRANSLATE_FRACTION),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        }
        ops.append(SeededRandAugment(tune.rand_augment, hparams, timm_choice=True))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if tune.erasing_prob > 0:
        ops.append(RandomErasing(tune.erasing_prob, mode="pixel", max_count=1, num_splits=0, device="cpu"))
    return T.Compose(ops)


def _fine_to_coarse(dataset: Any) -> Tensor | None:
    """Coarse class of each fine class, read off the split's label arrays (None without coarse labels)."""
    if getattr(dataset, "coarse_labels", None) is None:
        return None
    mapping = torch.full((len(dataset.classes),), -1, dtype=torch.long)
    mapping[torch.as_tensor(dataset.labels)] = torch.as_tensor(dataset.coarse_labels)
    return mapping


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Top-1 / top-5 on the fine labels and top-1 on the coarse labels of the fine prediction.

    Each rank scores a disjoint stride of the split (no padding), counts are summed over ranks.
    """
    indices = list(range(distributed.rank(), len(dataset), max(distributed.world_size(), 1)))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers, shuffle=False
    )
    mapping = _fine_to_coarse(dataset)
    coarse_of = None if mapping is None else mapping.to(device)
    coarse_labels = None if mapping is None else torch.as_tensor(dataset.coarse_labels)[indices]
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # fine top1, top5, coarse top1, seen
    offset = 0
    model.eval()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast():
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(dim=1).sum()
        if coarse_of is not None:
            target = coarse_labels[offset : offset + len(labels)].to(device)
            counts[2] += (coarse_of[top[:, 0]] == target).sum()
        counts[3] += len(labels)
        offset += len(labels)
    counts = distributed.all_reduce_sum(counts)
    seen = max(float(counts[3]), 1.0)
    result: dict[str, Any] = {"fine": {"top1": float(counts[0]) / seen, "top5": float(counts[1]) / seen}}
    if mapping is not None:
        result["coarse"] = {"top1": float(counts[2]) / seen}
    result["count"] = int(counts[3])
    return result


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_identity(checkpoint: str | Path, config: Config) -> dict[str, Any]:
    """What a fine-tuning checkpoint must share with the run that resumes it: the source checkpoint's
    bytes, the settings the result depends on (``RESULT_KEYS["finetune"]``), the data and the number
    of ranks."""
    settings = flatten(config.to_dict())
    return {
        "source_sha256": file_sha256(checkpoint),
        "settings": {
            key: value for key, value in settings.items() if depends_on(key, RESULT_KEYS["finetune"])
        },
        "prepared_dir": str(Path(config.data.prepared_dir).absolute()),
        "world_size": max(distributed.world_size(), 1),
    }


class FineTuner:
    """One fine-tuning run (one rank of it): the model, optimizer, schedule, seeded resumable input, and
    where the run stands, all of which :meth:`state_dict` records every ``finetune.checkpoint_every``
    iterations, at each epoch end and on a stop, so that a restarted run ends as an uninterrupted one.

    Every training image's augmentation (crop, flip, RandAugment, erasing) is a function of
    ``(train.seed, epoch, index)`` and the batch order of ``(train.seed, epoch)``
    (:mod:`mugs.data.loader`), so neither loader workers nor a restart change them; drop path and
    Mixup/CutMix draw from this rank's torch and NumPy generators, which the checkpoint records.
    """

    def __init__(self, checkpoint: str | Path, config: Config, out: str | Path) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from mugs.data.datasets import open_split, read_stats

        self.checkpoint, self.config, self.out = Path(checkpoint), config, Path(out)
        self.run_dir = RunDir(job_dir(out))
        tune = self.tune = config.finetune
        self.rank, self.world = distributed.rank(), max(distributed.world_size(), 1)
        _seed_everything(config.train.seed + self.rank)
        self.device = distributed.resolve_device(config.train.device)
        if self.device.type == "cpu" and config.train.threads:
            torch.set_num_threads(config.train.threads)
        payload = load_checkpoint(checkpoint)
        # the architecture and resolution the backbone was pretrained at, as for the frozen-feature
        # evaluations
        trained = trained_config(payload, checkpoint) if "config" in payload else config
        size = trained.augment.global_size

        mean, std = read_stats(config.data.prepared_dir)
        train_set = open_split(config.data.prepared_dir, "train")
        self.val_set = open_split(config.data.prepared_dir, "val", eval_transform(size, mean, std))
        self.test_set = open_split(config.data.prepared_dir, "test", eval_transform(size, mean, std))
        num_classes = len(train_set.classes)

        self.model = build_finetune_model(
            backbone_state(payload, tune.checkpoint_key, source=checkpoint),
            arch=trained.model.arch,
            patch_size=trained.model.patch_size,
            img_size=size,
            num_classes=num_classes,
            drop_path_rate=tune.drop_path_rate,
            depth=trained.model.depth,
        ).to(self.device)
        del payload

        # Mixup pairs each image with its mirror in the batch, so a rank's batch must be even.
        self.per_rank = max(2, min(tune.batch_size // self.world, len(train_set) // self.world) // 2 * 2)
        self.sampler = GlobalBatchSampler(
            len(train_set),
            self.per_rank * self.world,
            seed=config.train.seed,
            rank=self.rank,
            world_size=self.world,
        )
        self.steps = self.sampler.iterations_per_epoch
        self.host_group = distributed.host_group()
        workers = distributed.loader_workers(config.train.num_workers, self.device, self.host_group)
        self.loader = DataLoader(
            SeededAugmentedDataset(train_set, train_transform(size, tune, mean, std), config.train.seed),
            batch_sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            # the workers' base seed comes from this generator, never from the restored torch RNG
            generator=torch.Generator().manual_seed(config.train.seed),
            worker_init_fn=ignore_stop_signals,
        )

        groups = layer_decay_groups(self.model, weight_decay=tune.weight_decay, layer_decay=tune.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=tune.lr, betas=(0.9, 0.999))
        base_lr = tune.lr * self.per_rank * self.world / 256
        self.lr_schedule = cosine_schedule(base_lr, tune.min_lr, tune.epochs, self.steps, tune.warmup_epochs)
        mixing = tune.mixup > 0 or tune.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=tune.mixup,
                cutmix_alpha=tune.cutmix,
                label_smoothing=tune.label_smoothing,
                num_classes=num_classes,
            )
            if mixing
            else None
        )
        if mixing:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif tune.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(tune.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.autocast, self.scaler = mixed_precision(tune.precision, self.device, "finetune.precision")
        self.network: nn.Module = self.model
        if distributed.is_distributed():
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.identity = run_identity(checkpoint, config)
        self.epoch = self.step = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, Tensor] | None = None

    @property
    def global_iteration(self) -> int:
        return self.epoch * self.steps + self.step

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs (a collective: every rank's RNG states and loss sum are gathered)."""
        return {
            "format": FORMAT,
            "kind": "finetune",
            "identity": self.identity,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "global_iteration": self.global_iteration,
            "loss_sums": distributed.all_gather_objects(self.loss_sum.cpu(), self.host_group),
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "rng": ckpt.gather_rng_states(),
        }

    def save(self) -> Path | None:
        payload = self.state_dict()
        path = ckpt.atomic_save(payload, self.run_dir.latest) if self.rank == 0 else None
        distributed.barrier()
        return path

    def resume(self) -> bool:
        """Continue from ``latest.pt`` when it belongs to this run; one of other settings (another source
        checkpoint, other ``finetune.*``, data, seed or ranks) is set aside, never deleted."""
        latest = self.run_dir.latest
        if not latest.exists():
            return False
        payload = load_checkpoint(latest)
        if payload.get("kind") != "finetune" or payload["identity"] != self.identity:
            distributed.barrier()  # every rank has read it before rank 0 moves it
            if self.rank == 0:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                aside = self.run_dir.checkpoints.rename(
                    self.run_dir.checkpoints.with_name(f"checkpoints.superseded-{stamp}")
                )
                print(
                    f"{latest} was made with other settings: set aside as {aside}, starting afresh",
                    flush=True,
                )
            distributed.barrier()
            return False
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.loss_sum = payload["loss_sums"][self.rank].to(self.device)
        self.history, self.best, self.best_state = payload["history"], payload["best"], payload["best_state"]
        ckpt.restore_rank_rng_state(payload["rng"], latest)
        return True

    # ------------------------------------------------------------------ the loop
    def fit(
        self, *, stop_requested: Callable[[], bool] = lambda: False, progress: bool = True
    ) -> TrainResult:
        """Train from ``latest.pt`` (if any) to the last epoch, or until stopped (then ``interrupted``,
        with a checkpoint); a finished run scores its best epoch on test and writes the metrics."""
        started = time.perf_counter()
        self.resume()
        checkpoint_every = self.tune.checkpoint_every
        while self.epoch < self.tune.epochs:
            self.sampler.set_position(self.epoch, self.step)
            self.network.train()
            for images, labels in self.loader:
                self.train_step(images, labels)
                self.step += 1
                if self.step == self.steps:
                    break  # the epoch's end: validation, then its checkpoint
                if distributed.any_rank(stop_requested(), self.host_group):
                    return TrainResult("interrupted", self.global_iteration, self.save())
                if checkpoint_every and self.global_iteration % checkpoint_every == 0:
                    self.save()
            self._close_epoch(progress)
            self.save()
            if self.epoch < self.tune.epochs and distributed.any_rank(stop_requested(), self.host_group):
                return TrainResult("interrupted", self.global_iteration, self.run_dir.latest)
        self._write_metrics(time.perf_counter() - started)
        return TrainResult("finished", self.global_iteration, self.run_dir.latest)

    def train_step(self, images: Tensor, labels: Tensor) -> None:
        it = self.global_iteration
        apply_schedules(self.optimizer, float(self.lr_schedule[it]), self.tune.weight_decay)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        with self.autocast():
            loss = self.criterion(self.network(images).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"fine-tuning loss is {loss.item()} at epoch {self.epoch}, step {self.step}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.loss_sum += loss.detach()

    def _evaluate(self, dataset: Dataset) -> dict[str, Any]:
        return evaluate_classifier(
            self.model,
            dataset,
            batch_size=self.per_rank,
            workers=self.config.train.num_workers,
            device=self.device,
            autocast=self.autocast,
        )

    def _close_epoch(self, progress: bool) -> None:
        """Score the finished epoch on val, record it, keep the best (first on ties)."""
        val = self._evaluate(self.val_set)
        mean_loss = distributed.all_reduce_mean(self.loss_sum / self.steps)
        record = {
            "epoch": self.epoch + 1,
            "train_loss": float(mean_loss),
            "val_top1": val["fine"]["top1"],
            "lr": float(self.lr_schedule[(self.epoch + 1) * self.steps - 1]),
        }
        self.history.append(record)
        if progress and self.rank == 0:
            print(
                f"finetune epoch {self.epoch + 1}/{self.tune.epochs}: loss {record['train_loss']:.4f}, "
                f"val top-1 {record['val_top1']:.4f}",
                flush=True,
            )
        if self.best is None or val["fine"]["top1"] > self.best["fine"]["top1"]:
            self.best = {**val, "epoch": self.epoch + 1}
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum = torch.zeros((), device=self.device)

    def _write_metrics(self, seconds: float) -> None:
        """Score the best epoch's model on test (only it sees the test split); write the metrics file."""
        from mugs.evaluation.metrics_io import write_metrics

        assert self.best is not None and self.best_state is not None
        self.model.load_state_dict(self.best_state)
        test = self._evaluate(self.test_set)
        metrics: dict[str, Any] = {
            "evaluation": "finetune",
            "fine": test["fine"],
            **({"coarse": test["coarse"]} if "coarse" in test else {}),
            "best_epoch": self.best["epoch"],
            "val": {k: self.best[k] for k in ("fine", "coarse") if k in self.best},
            "epochs": self.tune.epochs,
            "test_count": test["count"],
            "history": self.history,
        }
        if self.rank == 0:
            write_metrics(
                self.out, metrics, config=self.config, checkpoint=self.checkpoint, timing={"seconds": seconds}
            )


def run_finetune(
    checkpoint: str | Path,
    config: Config,
    out: str | Path,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    progress: bool = True,
    locked: bool = False,
) -> TrainResult:
    """Fine-tune the backbone of ``checkpoint`` on the prepared train split; write metrics to ``out``.

    Every epoch is scored on the validation split; the best one (first on ties) is scored on test.
    The metrics (``fine``/``coarse`` test accuracy, ``best_epoch``, ``val`` accuracy and a per-epoch
    ``history``) go to the JSON file ``out`` through ``write_metrics`` on rank 0. The run's state lives
    in ``job_dir(out)`` (``eval/finetune.json`` → ``eval/finetune/``: its lock and ``latest.pt``), so a
    stopped or killed run resumes where it was. The architecture and input size come from the
    checkpoint's own config when it has one, else from ``config``; the data, the fine-tuning settings
    (``config.finetune``), the seed and the device (``train.device``, ``train.num_workers``) always come
    from ``config``. With ``locked`` the caller (a launcher) holds the run directory's lock.
    """
    distributed.resolve_device(config.train.device)  # before the lock creates the run directory
    with nullcontext() if locked else locked_run_directory(job_dir(out)):
        tuner = FineTuner(checkpoint, config, out)
        return tuner.fit(stop_requested=stop_requested, progress=progress)
