"""Files per second of `mugs prepare` on a synthetic ImageFolder tree of 64×64 JPEGs.

    python benchmarks/prepare.py [--images 20000] [--classes 100] [--workers 2] [--json PATH]

Builds the tree deterministically in a temporary directory (a smooth colour gradient plus seeded noise
per image, so the JPEGs are of realistic size), prepares it from scratch ("cold": every file decoded),
then again with the per-file cache warm ("warm": unchanged files are not decoded again), and reports
both timings with the counts of decoded and cached files.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import machine_info, make_tree, report

from mugs.config import DataConfig
from mugs.data.prepare import run_prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="processes of mugs prepare (data.workers)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mugs-prepare-bench-") as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "prepared"
        size = make_tree(root, args.images, args.classes)
        config = DataConfig(source="imagefolder", root=str(root), prepared_dir=str(out), workers=args.workers)
        cold = run_prepare(config, progress=False)
        warm = run_prepare(config, progress=False)
    figures: dict[str, Any] = {
        "images": args.images,
        "classes": args.classes,
        "kib_per_image": size / args.images / 1024,
        "workers": args.workers,
        "cold_seconds": cold.seconds,
        "cold_files_per_second": args.images / cold.seconds,
        "cold_decoded": cold.decoded,
        "cold_cached": cold.cached,
        "warm_seconds": warm.seconds,
        "warm_files_per_second": args.images / warm.seconds,
        "warm_decoded": warm.decoded,
        "warm_cached": warm.cached,
        **machine_info(torch.device("cpu")),
    }
    report("mugs prepare", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
