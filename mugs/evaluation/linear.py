"""Linear probes on frozen features: a sweep of learning rates × weight decays trained in one pass.

All ``H`` heads are one weight tensor ``W [H, D, C]`` and bias ``b [H, C]``; every batch goes through
all heads at once (``logits_h = x W_h + b_h``) and the loss is the sum of the heads' mean
cross-entropies, so head ``h`` gets exactly the gradient it would get alone. Each head then takes its
own SGD step (momentum 0.9, PyTorch's convention ``m ← 0.9 m + g + λ_h θ``, ``θ ← θ − η_h(t) m``) with
``η_h(t) = lr_h · batch/256 · ½(1 + cos(π t / t_max))`` per iteration. Heads start from N(0, 0.01²)
weights and zero biases (METHOD §8).

After every epoch each head is scored on the validation split and its best-so-far weights are kept
(the earliest epoch wins ties). The reported probe is the head with the highest validation top-1
(ties: the earlier head in sweep order, lrs outer, weight decays inner); only that head ever sees the
test split. Coarse accuracy is derived from the fine prediction through the fine→coarse class map,
not from a second probe: it measures whether the fine mistakes stay inside the right coarse group.

The probes read cached centre-crop features, so unlike DINO's recipe (random-resized crops and
flips through the frozen backbone every epoch) they see no augmentation; that makes a 100-epoch sweep
cost seconds instead of 100 backbone passes, at a small cost in accuracy on large datasets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mugs.config import Config
from mugs.evaluation.features import FeatureSet, evaluation_features
from mugs.evaluation.metrics_io import run_evaluation
from mugs.progress import progress_display

__all__ = [
    "ProbeSweep",
    "head_logits",
    "init_heads",
    "linear_evaluate",
    "run_linear",
    "train_linear_probes",
]

_MOMENTUM = 0.9


@dataclass
class ProbeSweep:
    """Per head ``h``: its ``lrs[h]`` / ``weight_decays[h]``, its weights at its best validation epoch
    (``weight [H, D, C]``, ``bias [H, C]``), that top-1 (``best_val_top1 [H]``) and epoch (1-based);
    ``best_head`` is the head reported.
    """

    lrs: list[float]
    weight_decays: list[float]
    weight: Tensor
    bias: Tensor
    best_val_top1: Tensor
    best_epoch: Tensor
    best_head: int


def init_heads(n_heads: int, dim: int, num_classes: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """``W ~ N(0, 0.01²)`` of shape ``[H, D, C]`` (drawn from a private seeded generator), ``b = 0``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_heads, dim, num_classes, generator=generator) * 0.01
    return weight, torch.zeros(n_heads, num_classes)


def head_logits(weight: Tensor, bias: Tensor, features: Tensor) -> Tensor:
    """``[H, N, C]`` logits of every head for ``features [N, D]``."""
    return torch.einsum("nd,hdc->hnc", features, weight) + bias[:, None, :]


@torch.no_grad()
def _head_top1(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor, batch_size: int) -> Tensor:
    correct = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(weight.device, torch.float32)
        y = labels[start : start + batch_size].to(weight.device)
        correct += (head_logits(weight, bias, x).argmax(dim=2) == y).sum(dim=1)
    return correct.double().cpu() / features.shape[0]


def train_linear_probes(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ProbeSweep:
    """Train one head per ``(lr, weight decay)`` pair on frozen features; keep each head's best-on-val
    weights; pick the head with the best validation top-1. ``lrs`` are for a batch of 256.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    n, dim = train_features.shape
    weight, bias = init_heads(len(pairs), dim, num_classes, seed=seed)
    weight, bias = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
    head_lr = torch.tensor([lr * batch_size / 256 for lr, _ in pairs], device=device)
    head_wd = torch.tensor([wd for _, wd in pairs], device=device)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    best_weight, best_bias = weight.detach().clone(), bias.detach().clone()
    best_top1 = torch.full((len(pairs),), -1.0, dtype=torch.float64)
    best_epoch = torch.zeros(len(pairs), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    train_labels = train_labels.to(device)

    with progress_display(progress) as bar:
        task = bar.add_task(f"linear probes ({len(pairs)} heads)", total=epochs, unit="epochs")
        step = 0
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                x = train_features[index].to(device, torch.float32)
                y = train_labels[index.to(device)]
                logits = head_logits(weight, bias, x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(pairs)), reduction="sum") / len(y)
                weight.grad = bias.grad = None
                loss.backward()
                scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                with torch.no_grad():
                    for parameter, buffer in zip((weight, bias), momentum, strict=True):
                        shape = (-1,) + (1,) * (parameter.dim() - 1)
                        gradient = parameter.grad + head_wd.view(shape) * parameter
                        buffer.mul_(_MOMENTUM).add_(gradient)
                        parameter.sub_((head_lr * scale).view(shape) * buffer)
                step += 1
            top1 = _head_top1(weight.detach(), bias.detach(), val_features, val_labels, max(batch_size, 1024))
            improved = top1 > best_top1
            best_top1 = torch.where(improved, top1, best_top1)
            best_epoch[improved] = epoch
            mask = improved.to(device)
            best_weight[mask] = weight.detach()[mask]
            best_bias[mask] = bias.detach()[mask]
            bar.update(task, advance=1, description=f"linear probes: best val top-1 {best_top1.max():.4f}")
    return ProbeSweep(
        lrs=[lr for lr, _ in pairs],
        weight_decays=[wd for _, wd in pairs],
        weight=best_weight.cpu(),
        bias=best_bias.cpu(),
        best_val_top1=best_top1,
        best_epoch=best_epoch,
        best_head=int(torch.argmax(best_top1)),
    )


@torch.no_grad()
def _test_accuracy(
    weight: Tensor, bias: Tensor, test: FeatureSet, coarse_of_class: Tensor | None
) -> dict[str, float]:
    logits = torch.cat(
        [
            head_logits(weight[None], bias[None], test.features[start : start + 4096].float())[0]
            for start in range(0, len(test), 4096)
        ]
    )
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    result = {
        "top1": float((top5[:, 0] == test.labels).double().mean()),
        "top5": float((top5 == test.labels[:, None]).any(dim=1).double().mean()),
    }
    if coarse_of_class is not None and test.coarse_labels is not None:
        result["coarse_top1"] = float((coarse_of_class[top5[:, 0]] == test.coarse_labels).double().mean())
    return result


def linear_evaluate(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sweep on ``train``, select on ``val``, report the selected head's accuracy on ``test``."""
    sweep = train_linear_probes(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes=train.num_classes,
        lrs=lrs,
        weight_decays=weight_decays,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
    )
    h = sweep.best_head
    test_accuracy = _test_accuracy(sweep.weight[h], sweep.bias[h], test, train.coarse_of_class())
    return {
        "selected": {
            "lr": sweep.lrs[h],
            "weight_decay": sweep.weight_decays[h],
            "epoch": int(sweep.best_epoch[h]),
            "val_top1": float(sweep.best_val_top1[h]),
        },
        "test": test_accuracy,
        "epochs": epochs,
        "batch_size": batch_size,
        "feature_dim": int(train.features.shape[1]),
        "sweep": [
            {
                "lr": lr,
                "weight_decay": wd,
                "best_val_top1": float(top1),
                "best_epoch": int(epoch),
            }
            for lr, wd, top1, epoch in zip(
                sweep.lrs, sweep.weight_decays, sweep.best_val_top1, sweep.best_epoch, strict=True
            )
        ],
    }


def run_linear(
    checkpoint: str | Path,
    config: Config,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The linear-probe sweep of ``evaluate.linear_*`` on ``checkpoint``'s frozen features (train / val /
    test); writes the metrics JSON ``out`` and returns its contents without provenance.
    """
    from mugs.distributed import resolve_device

    settings = config.evaluate
    resolved = torch.device(device) if device else resolve_device(settings.device)
    return run_evaluation(
        config,
        out,
        checkpoint=checkpoint,
        features=lambda: evaluation_features(
            checkpoint, config, ("train", "val", "test"), linear=True, device=resolved, progress=progress
        ),
        header={
            "evaluation": "linear",
            "network": settings.network,
            "n_last_blocks": settings.linear_n_last_blocks,
            "avgpool": settings.linear_avgpool,
            "coarse": "derived from the fine prediction through the fine-to-coarse class map",
        },
        evaluate=lambda features: linear_evaluate(
            *features,
            lrs=settings.linear_lrs,
            weight_decays=settings.linear_weight_decays,
            epochs=settings.linear_epochs,
            batch_size=settings.linear_batch_size,
            seed=settings.linear_seed,
            device=resolved,
            progress=progress,
        ),
        timing_key="train_seconds",
    )
