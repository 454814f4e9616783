"""kNN throughput (queries per second) and peak memory on random features.

    python benchmarks/knn.py [--bank 100000] [--queries 10000] [--dim 384] [--device cpu]

Builds a seeded random bank (``--bank`` × ``--dim`` float32, ``--classes`` labels) and query set, then
times :func:`mugs.evaluation.knn.knn_evaluate` with k ∈ {10, 20, 100, 200} (one neighbour search at
k = 200, every k voted from it), the evaluation ``mugs knn`` runs. Peak memory is the process's peak
resident set size above its size before the search (bank and queries already allocated), from
``getrusage``; on CUDA, the peak of ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import peak_resident_bytes, resident_bytes

from mugs.evaluation.features import FeatureSet
from mugs.evaluation.knn import knn_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block")
    parser.add_argument("--bank-chunk-size", type=int, default=262144, help="bank rows per block")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    generator = torch.Generator().manual_seed(0)
    bank = FeatureSet(
        torch.randn(args.bank, args.dim, generator=generator),
        torch.randint(0, args.classes, (args.bank,), generator=generator),
        None,
        [str(c) for c in range(args.classes)],
        None,
    )
    queries = FeatureSet(
        torch.randn(args.queries, args.dim, generator=generator),
        torch.randint(0, args.classes, (args.queries,), generator=generator),
        None,
        bank.classes,
        None,
    )
    ks = [10, 20, 100, 200]
    settings = dict(chunk_size=args.chunk_size, bank_chunk_size=args.bank_chunk_size, device=device)
    # warm-up: kernel selection and allocator pools, outside the timed run
    knn_evaluate(
        bank,
        FeatureSet(queries.features[:64], queries.labels[:64], None, bank.classes, None),
        ks=ks,
        temperature=0.07,
        **settings,
    )

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resident_bytes()
    start = time.perf_counter()
    result = knn_evaluate(bank, queries, ks=ks, temperature=0.07, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        memory = f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
    else:
        memory = f"peak RSS above baseline {max(0, peak_resident_bytes() - baseline) / 2**20:,.0f} MiB"
    print(
        f"bank {args.bank:,} x {args.dim}, {args.queries:,} queries, k {ks}, {args.classes} classes, "
        f"chunks {args.chunk_size} x {args.bank_chunk_size}, {device}, {torch.get_num_threads()} threads"
    )
    bank_mib = bank.features.numel() * 4 / 2**20
    print(f"{seconds:.2f} s, {args.queries / seconds:,.0f} queries/s, {memory} (bank {bank_mib:,.0f} MiB)")
    print(f"top-1 at k=20: {result['fine']['20']['top1']:.4f} (chance {1 / args.classes:.4f})")


if __name__ == "__main__":
    main()
