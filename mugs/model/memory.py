"""Memory of past features from which the local-group branch fetches its neighbours."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mugs.ring_buffer import ring_write

__all__ = ["POINTER_MODES", "NeighbourMemory"]

POINTER_MODES = ("fixed", "official")


class NeighbourMemory(nn.Module):
    """Ring buffer of ``size`` features searched by cosine similarity (METHOD §3).

    ``retrieve(q)`` returns ``values[topn_k cos(q, search_keys[k])]``: the search runs on
    L2-normalised rows, but the returned rows are raw. Every write puts the same row into both
    buffers, so they differ only in rows never written; they start as two independent N(0, 1) draws
    because the released checkpoints were trained that way (official ``queue_q`` → ``search_keys``,
    ``queue_k`` → ``values``; ``queue_v`` was never read).

    ``pointer_mode``:
        ``"fixed"``: a proper ring buffer, the pointer advances by n (mod size).
        ``"official"``: the public code's pointer. A write that fits before the end leaves the
        pointer at ``(ptr + 2n) % size``, skipping n rows; a write that crosses the end wraps and
        leaves it at ``ptr + n - size``. Only for parity with released checkpoints.
    """

    def __init__(self, size: int, dim: int, top_n: int = 8, pointer_mode: str = "fixed") -> None:
        super().__init__()
        if pointer_mode not in POINTER_MODES:
            raise ValueError(f"unknown pointer_mode {pointer_mode!r}; valid: {', '.join(POINTER_MODES)}")
        if not 0 < top_n <= size:
            raise ValueError(f"top_n must be in [1, size={size}], got {top_n}")
        self.size = size
        self.dim = dim
        self.top_n = top_n
        self.pointer_mode = pointer_mode
        self.register_buffer("search_keys", torch.randn(size, dim))
        self.register_buffer("values", torch.randn(size, dim))
        self.register_buffer("pointer", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def retrieve(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, D]`` → the ``top_n`` most cosine-similar rows ``[B, top_n, D]`` (fp32, no grad)."""
        query = F.normalize(query.detach().float(), dim=-1)
        keys = F.normalize(self.search_keys.float(), dim=-1)
        index = torch.topk(query @ keys.T, self.top_n, dim=-1).indices
        return self.values.float()[index]

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write ``rows`` ``[n, D]`` (already gathered over ranks) at the pointer; n == 0 is a no-op.

        The pointer is only ever read on the device (slots and the new pointer are tensor arithmetic),
        so a write costs the training step no host synchronisation.
        """
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows.detach().to(device=self.values.device, dtype=self.values.dtype)
        if self.pointer_mode == "official":
            if n > self.size:
                raise ValueError(f"cannot write {n} rows into a memory of {self.size} (official pointer)")
            self._write((self.pointer + torch.arange(n, device=rows.device)) % self.size, rows)
            # a write that fits leaves the pointer at (ptr + 2n) % size, one that wraps at ptr + n - size
            end = self.pointer + n
            self.pointer.copy_(torch.where(end <= self.size, (end + n) % self.size, end - self.size))
            return
        slots, dropped = ring_write(self.pointer, n, self.size)
        self._write(slots, rows[dropped:])

    def _write(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        self.search_keys.index_copy_(0, index, rows)
        self.values.index_copy_(0, index, rows)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, top_n={self.top_n}, pointer_mode={self.pointer_mode!r}"
