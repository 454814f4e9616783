"""The heads of a linear-probe sweep (learning rates × weight decays) trained together, the protocol
both linear probes share (:mod:`mugs.evaluation.linear`: cached features; :mod:`mugs.evaluation.
augmented_probe`: augmented views through the frozen backbone).

All ``H`` heads are one weight tensor ``W [H, D, C]`` and bias ``b [H, C]``; every batch goes through
all heads at once (``logits_h = x W_h + b_h``) and the loss is the sum of the heads' mean
cross-entropies, so head ``h`` gets exactly the gradient it would get alone. Each head then takes its
own SGD step (momentum 0.9, PyTorch's convention ``m ← 0.9 m + g + λ_h θ``, ``θ ← θ − η_h(t) m``) with
``η_h(t) = η_min + (lr_h · batch/256 − η_min) · ½(1 + cos(π t / t_max))`` per iteration
(``η_min``: ``evaluate.linear_min_lr``). Heads start from N(0, 0.01²) weights and zero biases (METHOD §8).

After every epoch each head is scored on the validation split and its best-so-far weights are kept
(the earliest epoch wins ties). The reported probe is the head with the highest validation top-1
(ties: the earlier head in sweep order, lrs outer, weight decays inner); only that head ever sees the
test split. Coarse accuracy is derived from the fine prediction through the fine→coarse class map,
not from a second probe: it measures whether the fine mistakes stay inside the right coarse group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mugs.config import EvalConfig
from mugs.evaluation.features import FeatureSet

__all__ = ["HeadSweep", "ProbeSweep", "SweepSettings", "head_logits", "init_heads", "sweep_report"]

_MOMENTUM = 0.9


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep trains: a head per ``lrs`` (for a batch of 256) × ``weight_decays`` pair, for
    ``epochs`` in batches of ``batch_size``, the rate decaying to ``min_lr``, from ``seed``."""

    lrs: Sequence[float]
    weight_decays: Sequence[float]
    epochs: int
    batch_size: int
    min_lr: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, settings: EvalConfig) -> SweepSettings:
        """The sweep of ``evaluate.linear_*``."""
        return cls(
            settings.linear_lrs,
            settings.linear_weight_decays,
            settings.linear_epochs,
            settings.linear_batch_size,
            settings.linear_min_lr,
            settings.linear_seed,
        )


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


class HeadSweep:
    """The heads of a learning-rate × weight-decay sweep with their SGD state and best-on-val weights.

    Both protocols train it: :meth:`train_step` on one batch of features (cached or just computed from
    augmented views), :meth:`end_epoch` after every epoch. :meth:`state_dict` holds everything that
    changes while it trains, so a restored sweep continues exactly.
    """

    def __init__(
        self,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        dim: int,
        num_classes: int,
        *,
        batch_size: int,
        total_steps: int,
        min_lr: float = 0.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
        weight, bias = init_heads(len(self.pairs), dim, num_classes, seed=seed)
        self.weight, self.bias = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
        self.head_lr = torch.tensor([lr * batch_size / 256 for lr, _ in self.pairs], device=device)
        self.head_wd = torch.tensor([wd for _, wd in self.pairs], device=device)
        self.min_lr = min_lr
        self.total_steps = total_steps
        self.momentum = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]
        self.best_weight, self.best_bias = self.weight.detach().clone(), self.bias.detach().clone()
        self.best_top1 = torch.full((len(self.pairs),), -1.0, dtype=torch.float64)
        self.best_epoch = torch.zeros(len(self.pairs), dtype=torch.int64)
        self.step = 0

    def train_step(self, x: Tensor, y: Tensor) -> None:
        """One SGD step of every head on the features ``x [N, D]`` with labels ``y``."""
        logits = head_logits(self.weight, self.bias, x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(self.pairs)), reduction="sum") / len(y)
        self.weight.grad = self.bias.grad = None
        loss.backward()
        scale = 0.5 * (1.0 + math.cos(math.pi * self.step / self.total_steps))
        lr = self.min_lr + (self.head_lr - self.min_lr) * scale
        with torch.no_grad():
            for parameter, buffer in zip((self.weight, self.bias), self.momentum, strict=True):
                shape = (-1,) + (1,) * (parameter.dim() - 1)
                gradient = parameter.grad + self.head_wd.view(shape) * parameter
                buffer.mul_(_MOMENTUM).add_(gradient)
                parameter.sub_(lr.view(shape) * buffer)
        self.step += 1

    def end_epoch(self, epoch: int, val_features: Tensor, val_labels: Tensor, batch_size: int) -> float:
        """Score every head on val and keep the weights of those that improved; the best top-1 so far."""
        top1 = _head_top1(self.weight.detach(), self.bias.detach(), val_features, val_labels, batch_size)
        improved = top1 > self.best_top1
        self.best_top1 = torch.where(improved, top1, self.best_top1)
        self.best_epoch[improved] = epoch
        mask = improved.to(self.weight.device)
        self.best_weight[mask] = self.weight.detach()[mask]
        self.best_bias[mask] = self.bias.detach()[mask]
        return float(self.best_top1.max())

    def result(self) -> ProbeSweep:
        return ProbeSweep(
            lrs=[lr for lr, _ in self.pairs],
            weight_decays=[wd for _, wd in self.pairs],
            weight=self.best_weight.cpu(),
            bias=self.best_bias.cpu(),
            best_val_top1=self.best_top1,
            best_epoch=self.best_epoch,
            best_head=int(torch.argmax(self.best_top1)),
        )

    def state_dict(self) -> dict[str, Any]:
        """The tensors that training changes, and the step that sets the learning rate."""
        return {
            "weight": self.weight.detach().clone(),
            "bias": self.bias.detach().clone(),
            "momentum": [buffer.clone() for buffer in self.momentum],
            "best_weight": self.best_weight.clone(),
            "best_bias": self.best_bias.clone(),
            "best_top1": self.best_top1.clone(),
            "best_epoch": self.best_epoch.clone(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name in ("weight", "bias", "best_weight", "best_bias", "best_top1", "best_epoch"):
                current = getattr(self, name)
                if state[name].shape != current.shape:
                    raise ValueError(
                        f"the saved probe state's {name} has shape {tuple(state[name].shape)}, "
                        f"this sweep's {tuple(current.shape)}"
                    )
                current.copy_(state[name])
            for buffer, saved in zip(self.momentum, state["momentum"], strict=True):
                buffer.copy_(saved)
        self.step = int(state["step"])


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


def sweep_report(
    sweep: ProbeSweep, test: FeatureSet, coarse_of_class: Tensor | None, settings: SweepSettings
) -> dict[str, Any]:
    """The metrics of a trained sweep: the head chosen on val, its accuracy on ``test`` (the only head
    that sees it), and every head's best val top-1."""
    h = sweep.best_head
    return {
        "selected": {
            "lr": sweep.lrs[h],
            "weight_decay": sweep.weight_decays[h],
            "epoch": int(sweep.best_epoch[h]),
            "val_top1": float(sweep.best_val_top1[h]),
        },
        "test": _test_accuracy(sweep.weight[h], sweep.bias[h], test, coarse_of_class),
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "feature_dim": int(sweep.weight.shape[1]),
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
