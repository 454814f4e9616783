"""Collapse watch: cheap signals that tell a healthy self-supervised run from a collapsing one.

Each function returns a Python float, so it synchronises with the device: call them at logging
intervals, not every iteration.

- ``feature_std``: spread of L2-normalised features over the batch. 0 when every image maps to the
  same vector (complete collapse); ≈ 1/√D for features spread uniformly on the unit sphere.
- ``group_entropy`` / ``normalised_group_entropy``: entropy of the batch-mean teacher distribution of
  the group head. Near 0 when one prototype takes every image (the collapse DINO's centring fights).
- ``effective_rank``: how many dimensions the batch actually uses (Roy & Vetterli 2007); 1 when all
  features are parallel, up to min(batch, D) when they fill the space (dimensional collapse shows
  as a small value).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Warning thresholds, deliberately loose: they flag runs that are collapsing, not merely mediocre.
# feature_std · √D is 1 for uniformly spread features and 0 for complete collapse.
STD_RATIO_THRESHOLD = 0.1
# Fraction of ln(out_dim) below which one or a few prototypes dominate the batch.
ENTROPY_RATIO_THRESHOLD = 0.1
# The effective rank warns below this fraction of min(dim, n_samples), or below the absolute floor
# (a rank near 1 means all features are parallel).
RANK_FRACTION_THRESHOLD = 0.05
MIN_RANK_THRESHOLD = 1.5


@torch.no_grad()
def feature_std(features: Tensor) -> float:
    """Std over the batch (dim 0) of the L2-normalised features [B, D], averaged over the D dimensions.

    The population std (no Bessel correction) is used so that a batch of one is defined (0).
    """
    normed = F.normalize(features.detach().float(), dim=-1)
    return normed.std(dim=0, correction=0).mean().item()


@torch.no_grad()
def group_entropy(teacher_probs: Tensor) -> float:
    """Entropy in nats, −Σ_k p̄_k ln p̄_k, of the batch-mean teacher distribution p̄ (rows of [B, K])."""
    mean_probs = teacher_probs.detach().float().mean(dim=0)
    return -torch.special.xlogy(mean_probs, mean_probs).sum().item()


def normalised_group_entropy(teacher_probs: Tensor) -> float:
    """``group_entropy`` divided by its maximum ln(K): 1 for a uniform batch mean, 0 for one prototype."""
    return group_entropy(teacher_probs) / math.log(teacher_probs.shape[-1])


@torch.no_grad()
def effective_rank(features: Tensor) -> float:
    """exp(H(σ / ‖σ‖₁)) for the singular values σ of the features [B, D] as given (not centred).

    Centring is skipped on purpose: a fully collapsed batch would become the zero matrix, whose rank
    is undefined, while uncentred it has rank 1.
    """
    singular_values = torch.linalg.svdvals(features.detach().float())
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    return torch.exp(-torch.special.xlogy(p, p).sum()).item()


def collapse_warnings(
    std: float | None,
    entropy_ratio: float | None,
    eff_rank: float | None,
    *,
    dim: int,
    n_samples: int | None = None,
) -> list[str]:
    """Human-readable warnings for the signals that cross their threshold; empty when all look healthy.

    ``std`` and ``eff_rank`` come from features of dimension ``dim``; ``n_samples`` (the batch size the
    rank was measured on) caps the attainable rank. A signal given as None (e.g. the group loss is
    disabled) is skipped. Thresholds are the module constants above.
    """
    warnings: list[str] = []
    if std is not None and std * math.sqrt(dim) < STD_RATIO_THRESHOLD:
        warnings.append(
            f"feature std {std:.2e} is below {STD_RATIO_THRESHOLD}/sqrt({dim}) = "
            f"{STD_RATIO_THRESHOLD / math.sqrt(dim):.2e}: features are collapsing to one point"
        )
    if entropy_ratio is not None and entropy_ratio < ENTROPY_RATIO_THRESHOLD:
        warnings.append(
            f"group entropy is {entropy_ratio:.3f} of its maximum (< {ENTROPY_RATIO_THRESHOLD}): "
            "a few prototypes take every image"
        )
    if eff_rank is not None:
        ceiling = dim if n_samples is None else min(dim, n_samples)
        threshold = max(MIN_RANK_THRESHOLD, RANK_FRACTION_THRESHOLD * ceiling)
        if eff_rank < threshold:
            warnings.append(
                f"effective rank {eff_rank:.2f} is below {threshold:.2f} (of at most {ceiling}): "
                "features use very few dimensions"
            )
    return warnings
