"""Images per second per process of fine-tuning (``mugs finetune``), its input included.

    python benchmarks/finetune.py [--arch vit_small] [--patch-size 16] [--image-size 224] \\
        [--images 256] [--batch-size 32] [--workers 2] [--warmup 2] [--iters 10] \\
        [--device cpu|cuda] [--threads N] [--json PATH]

``--images`` synthetic 500×375 JPEGs (one class, and two for the test split) are prepared by ``mugs
prepare``, and a freshly initialised ``--arch`` teacher is saved as the pretrained checkpoint. The
timed loop is :class:`mugs.evaluation.finetune.FineTuner`'s own: its seeded, resumable loader with
``--workers`` processes (``train.num_workers``) renders the recipe's views (bicubic random resized crop,
flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25), and :meth:`FineTuner.train_step` runs Mixup/
CutMix, the forward and backward pass with drop path 0.1 and the layer-decayed AdamW step, one batch of
``--batch-size`` per iteration on one process. ``images_per_second`` is over the ``--iters`` iterations
after ``--warmup``; ``data_wait_fraction`` is the share of that time spent waiting for the loader, and
``step_images_per_second`` the rate of the steps alone. Checkpoints are not written in the loop
(``latest.pt`` costs one ``torch.save`` of model, optimizer and best weights every
``finetune.checkpoint_every`` iterations).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    JPEG_SIZE,
    add_device_arguments,
    add_model_arguments,
    chosen_device,
    machine_info,
    make_tree,
    report,
    synchronize,
)

from mugs.config import DataConfig, config_from_dict
from mugs.data.prepare import run_prepare
from mugs.evaluation.finetune import FineTuner
from mugs.testing.finetuning import pretrained_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, "training crop")
    parser.add_argument("--images", type=int, default=256, help="training images")
    parser.add_argument("--batch-size", type=int, default=32, help="images per iteration on this process")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (train.num_workers)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    add_device_arguments(parser)
    return parser.parse_args(argv)


def prepared_splits(scratch: Path, images: int) -> Path:
    """``images`` training JPEGs (and a test split of two) prepared by ``mugs prepare``."""
    root, prepared = scratch / "images", scratch / "prepared"
    # setup only, not timed: a process per 64 images, up to the cores this process may use
    workers = min(len(os.sched_getaffinity(0)), max(1, images // 64))
    make_tree(root, images + 3, classes=1, size=JPEG_SIZE, workers=workers)
    test = root / "test" / "class_000"
    test.mkdir(parents=True)
    for path in sorted((root / "train" / "class_000").iterdir())[:2]:
        shutil.move(path, test / path.name)
    run_prepare(
        DataConfig(
            source="imagefolder",
            root=str(root),
            prepared_dir=str(prepared),
            val_fraction=1e-6,
            workers=workers,
        ),
        progress=False,
    )
    return prepared


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = chosen_device(args)
    with tempfile.TemporaryDirectory(prefix="mugs-finetune-bench-") as scratch:
        scratch = Path(scratch)
        config = config_from_dict(
            {
                "model": {"arch": args.arch, "depth": args.depth, "patch_size": args.patch_size},
                "augment": {"global_size": args.image_size, "local_size": args.patch_size},
                "data": {"source": "imagefolder", "prepared_dir": str(prepared_splits(scratch, args.images))},
                "train": {"device": args.device, "num_workers": args.workers, "threads": args.threads},
                "finetune": {"batch_size": args.batch_size, "epochs": 1, "warmup_epochs": 0},
                "evaluate": {"linear_n_last_blocks": 1},
            }
        )
        checkpoint = pretrained_checkpoint(scratch / "pretrained.pt", config)
        tuner = FineTuner(checkpoint, config, scratch / "finetune.json")
        if tuner.steps < args.warmup + args.iters:
            raise SystemExit(
                f"--images {args.images} give {tuner.steps} iterations; need {args.warmup + args.iters}"
            )
        tuner.network.train()
        batches = iter(tuner.loader)
        waited = stepped = 0.0
        for iteration in range(args.warmup + args.iters):
            if iteration == args.warmup:
                synchronize(device)
                waited = stepped = 0.0
                started = time.perf_counter()
            before = time.perf_counter()
            images, labels = next(batches)
            ready = time.perf_counter()
            tuner.train_step(images, labels)
            tuner.step += 1
            synchronize(device)
            waited += ready - before
            stepped += time.perf_counter() - ready
        seconds = time.perf_counter() - started
    timed = args.iters * tuner.per_rank
    figures = {
        **machine_info(device),
        "arch": args.arch,
        "depth": len(tuner.model.blocks),
        "image_size": args.image_size,
        "batch": tuner.per_rank,
        "workers": args.workers,
        "iters": args.iters,
        "images_per_second": timed / seconds,
        "step_images_per_second": timed / stepped,
        "data_wait_fraction": waited / seconds,
        "seconds_per_iteration": seconds / args.iters,
    }
    report(f"fine-tuning, {args.arch} at {args.image_size} px on {device}", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
