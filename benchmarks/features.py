"""Images per second and peak memory of the evaluation's feature extraction (``mugs knn``, ``mugs select``).

    python benchmarks/features.py [--arch vit_small] [--patch-size 16] [--image-size 224] \\
        [--images 256] [--batch-size 256] [--workers 4] [--device cpu|cuda] [--threads N] [--json PATH]

The teacher backbone of a freshly initialised ``--arch`` network (with its relation block, as training
writes it) is saved as a checkpoint, and ``--images`` synthetic 500×375 JPEGs are generated and
prepared by ``mugs prepare`` into a temporary directory. The timed call is the evaluation's own
:func:`mugs.evaluation.features.evaluation_features` on the train split, as ``mugs knn`` makes it: load
the checkpoint, build the backbone, read and decode the JPEGs with ``--workers`` loader processes
(``evaluate.num_workers``), resize to ``round(s · 256/224)`` and centre-crop ``s = --image-size``, run
batches of ``--batch-size`` (``evaluate.batch_size``) on ``--device`` and write the feature file. The
features land in a fresh, empty cache directory, so nothing is read from a cache; a first, untimed
call on the one held-out validation image pays the process's one-time costs (CUDA context, kernels).
The evaluation has no mixed precision: extraction runs in fp32.

``images_per_second`` is the whole call's. It holds per-call costs that a short split does not
amortise, so the call is also split at its batches: ``first_batch_seconds`` (hashing and loading the
checkpoint, starting the loader processes, the first batch read and run), the rate of the batches after
the first (``after_first_batch_images_per_second``) and ``after_last_batch_seconds`` (writing the
feature file and opening it again). With several batches per loader process, the rate after the first
batch is the pace of a long split, set by the slower of the loader and the network; with no more
batches than loader processes, they are all read while the first one is, and it is the network's. The
batches are timed by wrapping, from here, the per-batch forward pass the extraction makes.

Extraction is bounded in memory: the network runs one batch at a time (each loader process prefetches
two) and the rows go straight into a file-backed tensor, so the peak does not grow with the number of
images (``features_mib`` is what holding them all would cost). Peak memory is the process's peak
resident set size during the timed call above its size before it (the peak is restarted first through
``/proc/self/clear_refs``; loader processes excluded); on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from _common import (
    TimedPeak,
    add_device_arguments,
    add_model_arguments,
    chosen_device,
    machine_info,
    prepared_jpegs,
    report,
    synchronize,
)

from mugs.config import Config, config_from_dict
from mugs.evaluation import features as extraction
from mugs.evaluation.features import evaluation_features
from mugs.testing.finetuning import pretrained_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, "evaluation crop")
    parser.add_argument("--images", type=int, default=256, help="images in the extracted split")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (evaluate.num_workers)")
    add_device_arguments(parser)
    return parser.parse_args(argv)


def evaluation_config(args: argparse.Namespace, prepared: Path, cache: Path) -> Config:
    return config_from_dict(
        {
            "model": {"arch": args.arch, "depth": args.depth, "patch_size": args.patch_size},
            # local crops play no part in the evaluation; any valid size will do
            "augment": {"global_size": args.image_size, "local_size": args.image_size},
            "data": {"source": "imagefolder", "prepared_dir": str(prepared)},
            "evaluate": {
                "device": args.device,
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "cache_dir": str(cache),
                # only the kNN features are extracted; keep the probe setting valid for shallow models
                "linear_n_last_blocks": 1,
            },
        }
    )


class BatchClock:
    """Stands in for the extraction's per-batch forward pass and notes when each batch is done."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device) -> None:
        self.forward, self.device = forward, device
        self.done: list[tuple[float, int]] = []  # (time, images) per batch

    def __call__(self, backbone: torch.nn.Module, images: torch.Tensor, *args: Any) -> torch.Tensor:
        rows = self.forward(backbone, images, *args)
        synchronize(self.device)
        self.done.append((time.perf_counter(), len(images)))
        return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = chosen_device(args)
    with tempfile.TemporaryDirectory(prefix="mugs-features-bench-") as scratch:
        scratch = Path(scratch)
        # setup only, not timed: a process per 64 images, up to the cores this process may use
        setup_workers = min(len(os.sched_getaffinity(0)), max(1, args.images // 64))
        prepared, source = prepared_jpegs(scratch, args.images, setup_workers)
        cache = scratch / "features"
        config = evaluation_config(args, prepared, cache)
        checkpoint = scratch / "checkpoint.pt"
        pretrained_checkpoint(checkpoint, config)
        evaluation_features(checkpoint, config, ["val"], device=device, progress=False)
        if any(cache.glob("*-train-*")):
            raise RuntimeError(f"{cache} already holds train features: the timed call would read them")

        clock = BatchClock(extraction.features_of_batch, device)
        # TimedPeak restarts the peak: generating the JPEGs and the checkpoint may have peaked higher
        with TimedPeak(device) as timed, mock.patch.object(extraction, "features_of_batch", clock):
            (train,) = evaluation_features(checkpoint, config, ["train"], device=device, progress=False)
        rows, dim = train.features.shape
        if rows != args.images or sum(images for _, images in clock.done) != rows:
            raise RuntimeError(f"extracted {rows} feature rows, expected {args.images}")
    (first_done, first_images), (last_done, _) = clock.done[0], clock.done[-1]
    after_first = None
    if len(clock.done) > 1:
        after_first = (rows - first_images) / (last_done - first_done)
    figures: dict[str, Any] = {
        "arch": args.arch,
        "depth": args.depth,
        "patch_size": args.patch_size,
        "image_size": args.image_size,
        "source": source,
        "images": args.images,
        "batch_size": args.batch_size,
        "loader_workers": args.workers,
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "feature_dim": dim,
        "seconds": timed.seconds,
        "images_per_second": args.images / timed.seconds,
        "first_batch_seconds": first_done - timed.start,
        "after_first_batch_images_per_second": after_first,
        "after_last_batch_seconds": timed.start + timed.seconds - last_done,
        "peak_memory_mib": timed.peak_mib,
        "peak_memory_kind": timed.kind,
        "features_mib": rows * dim * 4 / 2**20,
        **machine_info(device),
    }
    report("Feature extraction (evaluation path)", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
