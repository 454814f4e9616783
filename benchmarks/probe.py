"""Images per second, per process, of the augmented linear probe (``evaluate.linear_protocol: augmented``).

    python benchmarks/probe.py [--arch vit_small] [--patch-size 16] [--image-size 224] [--images 256] \\
        [--batch-size 64] [--lrs 7] [--weight-decays 2] [--workers 2] [--device cpu|cuda] [--threads N] \\
        [--json PATH]

``--images`` synthetic 500×375 JPEGs are generated and prepared by ``mugs prepare`` into a temporary
directory; a freshly initialised ``--arch`` backbone is the frozen network. The timed call is one epoch
of :meth:`mugs.evaluation.augmented_probe.AugmentedProbe.fit` as ``mugs linear`` runs it: ``--workers``
loader processes read, decode, random-resize-crop and flip the images, each batch of ``--batch-size``
goes once through the backbone (the last 4 blocks' CLS tokens, as ViT-S's probe) and one SGD step of a
sweep of ``--lrs`` × ``--weight-decays`` heads; the val scoring at the epoch's end reads a small
feature set. ``images_per_second`` counts the batches after the first (the first pays for starting the
loader processes); ``heads_ms_per_batch`` is the sweep's share of a batch, timed by wrapping the
heads' step from here: it shows what the one forward per batch saves, since a sweep trained head by
head would pay the backbone's share once per head.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_device_arguments,
    add_model_arguments,
    chosen_device,
    machine_info,
    prepared_jpegs,
    report,
    synchronize,
)

from mugs.data.datasets import open_split, read_stats
from mugs.evaluation.augmented_probe import AugmentedProbe, probe_transform
from mugs.evaluation.features import FeatureSet
from mugs.evaluation.heads import SweepSettings
from mugs.model.backbone import create_backbone

LAYERS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, "training crop")
    parser.add_argument("--images", type=int, default=256, help="training images (one epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lrs", type=int, default=7, help="learning rates in the sweep")
    parser.add_argument("--weight-decays", type=int, default=2, help="weight decays in the sweep")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (evaluate.num_workers)")
    add_device_arguments(parser)
    return parser.parse_args(argv)


class Clock:
    """Notes when each batch ends, and the time spent in the heads' step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.batch_ends: list[float] = []
        self.heads_seconds: list[float] = []

    def wrap(self, step: Any) -> Any:
        def timed(*args: Any) -> None:
            synchronize(self.device)
            start = time.perf_counter()
            step(*args)
            synchronize(self.device)
            self.batch_ends.append(time.perf_counter())
            self.heads_seconds.append(self.batch_ends[-1] - start)

        return timed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = chosen_device(args)
    with tempfile.TemporaryDirectory(prefix="mugs-probe-bench-") as scratch:
        prepared, source = prepared_jpegs(Path(scratch), args.images, max(1, args.workers))
        backbone = create_backbone(
            args.arch, patch_size=args.patch_size, img_size=args.image_size, depth=args.depth
        )
        backbone.eval().to(device)
        dim = backbone.embed_dim * LAYERS
        val = FeatureSet(torch.randn(64, dim), torch.zeros(64, dtype=torch.int64), None, ["only"], None)
        probe = AugmentedProbe(
            backbone,
            open_split(prepared, "train"),
            probe_transform(args.image_size, *read_stats(prepared)),
            val,
            SweepSettings(
                [1e-3 * (i + 1) for i in range(args.lrs)],
                [1e-4 * i for i in range(args.weight_decays)],
                epochs=1,
                batch_size=args.batch_size,
            ),
            layers=LAYERS,
            avgpool=False,
            num_workers=args.workers,
            device=device,
        )
        clock = Clock(device)
        probe.heads.train_step = clock.wrap(probe.heads.train_step)
        started = time.perf_counter()
        probe.fit()
        seconds = time.perf_counter() - started
    batches = len(clock.batch_ends)
    after_first = None
    if batches > 1:
        after_first = (batches - 1) * args.batch_size / (clock.batch_ends[-1] - clock.batch_ends[0])
    heads_ms = 1000 * sum(clock.heads_seconds[1:] or clock.heads_seconds) / max(1, batches - 1)
    figures: dict[str, Any] = {
        "arch": args.arch,
        "depth": args.depth,
        "patch_size": args.patch_size,
        "image_size": args.image_size,
        "source": source,
        "batch": args.batch_size,
        "batches": batches,
        "heads": args.lrs * args.weight_decays,
        "feature_dim": dim,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "epoch_seconds": seconds,
        "images_per_second": after_first,
        "heads_ms_per_batch": heads_ms,
        "ms_per_batch": None if after_first is None else 1000 * args.batch_size / after_first,
        **machine_info(device),
    }
    report("augmented linear probe, one process", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
