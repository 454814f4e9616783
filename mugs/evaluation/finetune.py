"""End-to-end fine-tuning of a pretrained backbone (METHOD §8), in the BEiT / iBOT recipe.

The backbone (teacher by default) gets a linear head on its normed class token and is trained with
AdamW under layer-wise learning-rate decay, a linear warmup then cosine schedule, stochastic depth,
timm's Mixup/CutMix with label smoothing (soft-target cross-entropy), RandAugment and random
erasing. The epoch with the best validation top-1 is kept and only that model is scored on test,
so the test split never influences a choice.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from mugs import distributed
from mugs.config import Config, FinetuneConfig
from mugs.data.transforms import SeededRandAugment
from mugs.evaluation.features import eval_transform
from mugs.model.backbone import MugsViT, create_backbone
from mugs.training.checkpoint import backbone_state, load_checkpoint, trained_config
from mugs.training.optim import apply_schedules, mixed_precision
from mugs.training.schedules import cosine_schedule

__all__ = [
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


def run_finetune(checkpoint: str | Path, config: Config, out: str | Path, *, progress: bool = True) -> dict:
    """Fine-tune the backbone of ``checkpoint`` on the prepared train split; write metrics to ``out``.

    Every epoch is scored on the validation split; the best one (first on ties) is scored on test.
    The metrics (``fine``/``coarse`` test accuracy, ``best_epoch``, ``val`` accuracy and a per-epoch
    ``history``) go to the JSON file ``out`` through ``write_metrics`` on rank 0, and are returned.
    The architecture and input size come from the checkpoint's own config when it has one, else from
    ``config``; the data, the fine-tuning settings (``config.finetune``), the seed and the device
    (``train.device``, ``train.num_workers``) always come from ``config``.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from mugs.data.datasets import open_split, read_stats
    from mugs.distributed import resolve_device
    from mugs.evaluation.metrics_io import write_metrics

    tune = config.finetune
    _seed_everything(config.train.seed + distributed.rank())
    device = resolve_device(config.train.device)
    payload = load_checkpoint(checkpoint)
    # the architecture and resolution the backbone was pretrained at, as for the frozen-feature
    # evaluations
    trained = trained_config(payload, checkpoint) if "config" in payload else config
    size = trained.augment.global_size

    mean, std = read_stats(config.data.prepared_dir)
    train_set = open_split(config.data.prepared_dir, "train", train_transform(size, tune, mean, std))
    val_set = open_split(config.data.prepared_dir, "val", eval_transform(size, mean, std))
    test_set = open_split(config.data.prepared_dir, "test", eval_transform(size, mean, std))
    num_classes = len(train_set.classes)

    model = build_finetune_model(
        backbone_state(payload, tune.checkpoint_key, source=checkpoint),
        arch=trained.model.arch,
        patch_size=trained.model.patch_size,
        img_size=size,
        num_classes=num_classes,
        drop_path_rate=tune.drop_path_rate,
        depth=trained.model.depth,
    ).to(device)
    del payload

    world = max(distributed.world_size(), 1)
    # Mixup pairs each image with its mirror in the batch, so a rank's batch must be even.
    per_rank = max(2, min(tune.batch_size // world, len(train_set) // world) // 2 * 2)
    sampler = (
        DistributedSampler(train_set, shuffle=True, seed=config.train.seed, drop_last=True)
        if distributed.is_distributed()
        else None
    )
    loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=True,
        num_workers=config.train.num_workers,
        generator=torch.Generator().manual_seed(config.train.seed),
        persistent_workers=config.train.num_workers > 0,
    )
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"the train split has {len(train_set)} images, too few for one batch of {per_rank}")

    groups = layer_decay_groups(model, weight_decay=tune.weight_decay, layer_decay=tune.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=tune.lr, betas=(0.9, 0.999))
    base_lr = tune.lr * per_rank * world / 256
    lr_schedule = cosine_schedule(base_lr, tune.min_lr, tune.epochs, steps, tune.warmup_epochs)

    mixing = tune.mixup > 0 or tune.cutmix > 0
    mixup = (
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
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif tune.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(tune.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    autocast, _scaler = mixed_precision(tune.precision, device, "finetune.precision")  # no fp16: no scaler

    network: nn.Module = model
    if distributed.is_distributed():
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, Tensor] | None = None
    started = time.perf_counter()
    eval_batch = max(per_rank, 1)
    for epoch in range(tune.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        network.train()
        loss_sum = torch.zeros((), device=device)
        for step, (images, labels) in enumerate(loader):
            it = epoch * steps + step
            apply_schedules(optimizer, float(lr_schedule[it]), tune.weight_decay)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with autocast():
                loss = criterion(network(images).float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        val = evaluate_classifier(
            model,
            val_set,
            batch_size=eval_batch,
            workers=config.train.num_workers,
            device=device,
            autocast=autocast,
        )
        record = {
            "epoch": epoch + 1,
            "train_loss": float(distributed.all_reduce_mean(loss_sum / steps)),
            "val_top1": val["fine"]["top1"],
            "lr": float(lr_schedule[(epoch + 1) * steps - 1]),
        }
        history.append(record)
        if progress and distributed.is_main_process():
            print(
                f"finetune epoch {epoch + 1}/{tune.epochs}: loss {record['train_loss']:.4f}, "
                f"val top-1 {record['val_top1']:.4f}",
                flush=True,
            )
        if best is None or val["fine"]["top1"] > best["fine"]["top1"]:
            best, best_state = {**val, "epoch": epoch + 1}, copy.deepcopy(model.state_dict())

    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    test = evaluate_classifier(
        model,
        test_set,
        batch_size=eval_batch,
        workers=config.train.num_workers,
        device=device,
        autocast=autocast,
    )
    metrics: dict[str, Any] = {
        "evaluation": "finetune",
        "fine": test["fine"],
        **({"coarse": test["coarse"]} if "coarse" in test else {}),
        "best_epoch": best["epoch"],
        "val": {k: best[k] for k in ("fine", "coarse") if k in best},
        "epochs": tune.epochs,
        "test_count": test["count"],
        "history": history,
    }
    if distributed.is_main_process():
        write_metrics(
            out,
            metrics,
            config=config,
            checkpoint=checkpoint,
            timing={"seconds": time.perf_counter() - started},
        )
    return metrics
