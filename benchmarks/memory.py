"""Milliseconds per call of the local-group neighbour memory and the InfoNCE queue, and peak memory.

    python benchmarks/memory.py [--size 65536] [--batch 64] [--top-n 8] [--memory-dim 384] \\
        [--queue-dim 256] [--n-local 10] [--device cpu|cuda] [--json PATH]

Times the modules the training step uses, at the paper's sizes by default (memories and queues of
65,536 entries, batch 64 per GPU, 8 neighbours; memory rows are the backbone width, 384 for vit_small,
queue rows the heads' ``model.out_dim``, 256):

- ``NeighbourMemory.retrieve`` of one batch of queries (cosine top-n over the whole memory), and of the
  queries one step sends: the teacher's 2 global crops, then the student's 4 globals and its
  ``--n-local`` locals (one call per run of same-size crops);
- ``NeighbourMemory.enqueue`` of one batch of rows (the teacher's write each step; the student's writes
  its weak-flagged half);
- the ring-buffer write of ``InfoNCEQueueLoss`` for one batch of keys (each of the two InfoNCE losses
  writes two per step).

Each figure is the median of ``--iters`` calls after ``--warmup``. Peak memory is the process's peak
resident set on CPU and ``torch.cuda.max_memory_allocated`` on CUDA; the buffers' own size is listed
beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import add_device_arguments, chosen_device, machine_info, peak_memory_mib, report, synchronize

from mugs.losses import InfoNCEQueueLoss
from mugs.model import NeighbourMemory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=65536, help="entries of each memory and queue")
    parser.add_argument("--batch", type=int, default=64, help="images per step on one device")
    parser.add_argument("--top-n", type=int, default=8, help="neighbours per query")
    parser.add_argument("--memory-dim", type=int, default=384, help="memory row width (backbone width)")
    parser.add_argument("--queue-dim", type=int, default=256, help="queue row width (model.out_dim)")
    parser.add_argument("--n-local", type=int, default=10, help="local crops per image")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    add_device_arguments(parser)
    return parser.parse_args(argv)


def median_ms(call: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = chosen_device(args)
    memory = NeighbourMemory(args.size, args.memory_dim, args.top_n).to(device)
    queue = InfoNCEQueueLoss(args.queue_dim, args.size, n_crops=2 + args.n_local).to(device)
    generator = torch.Generator().manual_seed(0)
    batch = args.batch

    def features(rows: int, dim: int) -> torch.Tensor:
        return torch.randn(rows, dim, generator=generator).to(device)

    queries = features(batch, args.memory_dim)
    step_queries = [features(n * batch, args.memory_dim) for n in (2, 4, args.n_local) if n]
    rows = features(batch, args.memory_dim)
    keys = torch.nn.functional.normalize(features(batch, args.queue_dim), dim=-1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step_retrievals() -> None:
        for part in step_queries:
            memory.retrieve(part)

    timing = dict(device=device, warmup=args.warmup, iters=args.iters)
    buffers = sum(b.numel() * b.element_size() for m in (memory, queue) for b in m.buffers())
    result: dict[str, Any] = {
        "size": args.size,
        "batch": batch,
        "top_n": args.top_n,
        "memory_dim": args.memory_dim,
        "queue_dim": args.queue_dim,
        "retrieve_batch_ms": median_ms(lambda: memory.retrieve(queries), **timing),
        "retrieve_step_ms": median_ms(step_retrievals, **timing),
        "retrieve_step_queries": sum(len(part) for part in step_queries),
        "memory_enqueue_ms": median_ms(lambda: memory.enqueue(rows), **timing),
        # the loss's own write; its forward computes the loss first
        "queue_enqueue_ms": median_ms(lambda: queue._enqueue(keys), **timing),
        "buffers_mib": buffers / 2**20,
        "peak_memory_mib": peak_memory_mib(device),
        "peak_memory_kind": "CUDA allocated" if device.type == "cuda" else "process RSS",
        **machine_info(device),
    }
    report("Neighbour memory and InfoNCE queue", result, args.json)
    return result


if __name__ == "__main__":
    main()
