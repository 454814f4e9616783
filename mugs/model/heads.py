"""Projection heads of the three Mugs supervisions (METHOD §4)."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["GroupHead", "ProjectionPredictionHead"]


def _mlp(dims: list[int], *, bias: bool, use_bn: bool) -> nn.Sequential:
    """Linear layers through ``dims`` with [BN] → GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(dims) - 2:
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _init_trunc_normal(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ProjectionPredictionHead(nn.Module):
    """Instance / local-group head: projector, and for the student a predictor.

    Teacher (``predictor=False``): ``z = normalise(P(x))`` (the target).
    Student: ``p = normalise(Q(normalise(P(x))))`` (the inner normalise only if ``norm_before_pred``).

    ``P`` = Linear(in→hidden) → [BN] → GELU → Linear(hidden→hidden) → [BN] → GELU → Linear(hidden→out),
    no biases, trunc-normal(0.02) init; its Linear layers sit at ``projector.{0,2,4}``, or at
    ``projector.{0,3,6}`` with ``use_bn`` (BN at 1 and 4). ``Q`` = Linear(out→pred_hidden) → GELU →
    Linear(pred_hidden→out), no biases, PyTorch's default init, Linear layers at ``predictor.{0,2}``.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 256,
        use_bn: bool = False,
        predictor: bool,
        predictor_hidden_dim: int = 4096,
        norm_before_pred: bool = True,
    ) -> None:
        super().__init__()
        self.norm_before_pred = norm_before_pred
        self.projector = _mlp([in_dim, hidden_dim, hidden_dim, out_dim], bias=False, use_bn=use_bn)
        _init_trunc_normal(self.projector)
        self.predictor = (
            _mlp([out_dim, predictor_hidden_dim, out_dim], bias=False, use_bn=False) if predictor else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(x)
        if self.predictor is None:
            return F.normalize(z, dim=-1)
        if self.norm_before_pred:
            z = F.normalize(z, dim=-1)
        return F.normalize(self.predictor(z), dim=-1)


class GroupHead(nn.Module):
    """Group (DINO-like) head: ``logits = W · normalise(P(x))`` with weight-normalised ``W``.

    ``P`` = Linear(in→hidden) → [BN] → GELU → Linear(hidden→hidden) → [BN] → GELU →
    Linear(hidden→bottleneck), with biases (zero-initialised), trunc-normal(0.02) weights.
    ``W`` row k = ``g_k · v_k / ‖v_k‖``; the gain ``g`` is
    ``last_layer.parametrizations.weight.original0`` ``[out, 1]`` (official ``weight_g``) and the
    direction ``v`` is ``original1`` ``[out, bottleneck]`` (official ``weight_v``). The gain starts
    at 1 and, with ``norm_last_layer``, stays frozen there, so the logits are cosine similarities.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.projector = _mlp([in_dim, hidden_dim, hidden_dim, bottleneck_dim], bias=True, use_bn=use_bn)
        _init_trunc_normal(self.projector)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.projector(x), dim=-1))
