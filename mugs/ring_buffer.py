"""The ring buffer's write rule, shared by the contrastive queues (mugs.losses) and the neighbour
memory (mugs.model.memory): where ``n`` new rows go, and how the pointer moves.

Index arithmetic stays on the pointer's device, so a write costs a training step no host
synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ring_write"]


@torch.no_grad()
def ring_write(pointer: Tensor, n: int, size: int) -> tuple[Tensor, int]:
    """Reserve the slots of ``n`` new rows in a ring buffer of ``size`` rows whose next slot is
    ``pointer`` (a one-element tensor, advanced by ``n`` modulo ``size`` in place).

    Returns the slots of the last ``min(n, size)`` rows, in order, and how many leading rows are
    dropped: of more rows than the buffer holds only the newest ``size`` survive the lap, and
    dropping the others up front writes no slot twice.
    """
    kept = min(n, size)
    slots = (pointer + (n - kept) + torch.arange(kept, device=pointer.device)) % size
    pointer.add_(n).remainder_(size)
    return slots, n - kept
