"""kNN throughput (queries per second) and peak memory on random features.

    python benchmarks/knn.py [--bank 100000] [--queries 10000] [--dim 384] [--classes 1000] \\
        [--device cpu|cuda] [--threads N] [--json PATH]

Builds a seeded random bank (``--bank`` × ``--dim`` float32, ``--classes`` labels) and query set, then
times :func:`mugs.evaluation.knn.knn_evaluate` with k ∈ {10, 20, 100, 200} (one neighbour search at
k = 200, every k voted from it), the evaluation ``mugs knn`` runs. Peak memory is the process's peak
resident set size during the search above its size before it (bank and queries already allocated),
from ``getrusage``; on CUDA, the peak of ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import (
    TimedPeak,
    add_device_arguments,
    chosen_device,
    machine_info,
    report,
)

from mugs.evaluation.features import FeatureSet
from mugs.evaluation.knn import knn_evaluate

KS = [10, 20, 100, 200]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block")
    parser.add_argument("--bank-chunk-size", type=int, default=262144, help="bank rows per block")
    add_device_arguments(parser)
    return parser.parse_args(argv)


def random_features(rows: int, dim: int, classes: list[str], generator: torch.Generator) -> FeatureSet:
    labels = torch.randint(0, len(classes), (rows,), generator=generator)
    return FeatureSet(torch.randn(rows, dim, generator=generator), labels, None, classes, None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = chosen_device(args)

    generator = torch.Generator().manual_seed(0)
    classes = [str(c) for c in range(args.classes)]
    bank = random_features(args.bank, args.dim, classes, generator)
    queries = random_features(args.queries, args.dim, classes, generator)
    settings = dict(
        ks=KS,
        temperature=0.07,
        chunk_size=args.chunk_size,
        bank_chunk_size=args.bank_chunk_size,
        device=device,
    )
    # warm-up: kernel selection and allocator pools, outside the timed run
    warmup = FeatureSet(queries.features[:64], queries.labels[:64], None, classes, None)
    knn_evaluate(bank, warmup, **settings)

    with TimedPeak(device) as timed:
        accuracy = knn_evaluate(bank, queries, **settings)
    figures: dict[str, Any] = {
        "bank": args.bank,
        "dim": args.dim,
        "queries": args.queries,
        "ks": KS,
        "classes": args.classes,
        "chunk_size": args.chunk_size,
        "bank_chunk_size": args.bank_chunk_size,
        "threads": torch.get_num_threads(),
        "seconds": timed.seconds,
        "queries_per_second": args.queries / timed.seconds,
        "peak_memory_mib": timed.peak_mib,
        "peak_memory_kind": timed.kind,
        "bank_mib": bank.features.numel() * bank.features.element_size() / 2**20,
        "top1_at_20": accuracy["fine"]["20"]["top1"],
        "chance_top1": 1 / args.classes,
        **machine_info(device),
    }
    report("kNN evaluation", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
