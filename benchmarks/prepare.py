"""Files per second of `mugs prepare` on a synthetic ImageFolder tree of 64×64 JPEGs.

    python benchmarks/prepare.py [--images 20000] [--classes 100] [--workers 2]

Builds the tree deterministically in a temporary directory (a smooth colour gradient plus seeded noise
per image, so the JPEGs are of realistic size), prepares it from scratch, then again with the per-file
cache warm, and prints both timings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import make_tree

from mugs.config import DataConfig
from mugs.data.prepare import run_prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mugs-prepare-bench-") as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "prepared"
        start = time.perf_counter()
        size = make_tree(root, args.images, args.classes)
        print(
            f"generated {args.images} JPEGs ({size / args.images / 1024:.1f} KiB each) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        config = DataConfig(source="imagefolder", root=str(root), prepared_dir=str(out), workers=args.workers)
        for label in ("cold (decode every file)", "warm (per-file cache)"):
            summary = run_prepare(config, progress=False)
            print(
                f"{label}: {summary.seconds:.2f} s, {args.images / summary.seconds:,.0f} files/s "
                f"(decoded {summary.decoded}, cached {summary.cached}, {args.workers} processes, "
                f"{os.cpu_count()} CPUs)"
            )


if __name__ == "__main__":
    main()
