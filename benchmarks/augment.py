"""Multi-crop augmentation throughput of the pretraining input, and the loader processes a step needs.

    python benchmarks/augment.py --setting paper --images 256 --workers 2 \\
        --step-json benchmark-results/step-vit_base-bf16-compile.json
    python benchmarks/augment.py --setting demo --workers 1
    python benchmarks/augment.py --setting paper --step-seconds 0.104 --batch 64
    python benchmarks/augment.py --setting paper --backend device --images 64

``paper``: the published crops (preset ``vit_small_100ep``: 2 teacher and 2 student globals of 224 px,
10 locals of 96 px) of ``--images`` 500×375 JPEGs generated deterministically into a temporary
ImageFolder tree, prepared by ``mugs prepare`` and read from its manifests as a run on ImageNet reads
them (size and SHA-256 checked, decoded, converted to RGB). ``demo``: the demo preset's crops
(4 × 28 + 2 × 14) of 28×28 grayscale images read from an IDX array, as the prepared Fashion-MNIST is.

Both run the training loop's own loader (``mugs.data.loader.build_loader``: seeded multi-crop
dataset, global batch sampler, collate); the image pool is cycled so that an epoch is as long as the
timing needs. The per-process rate is that loader with ``num_workers=0`` and one torch thread, which is
what one worker process does: the median of ``--repeats`` passes of ``--batches`` batches. With
``--workers N`` the same loader with N persistent, prefetching worker processes is timed from the moment
every worker has delivered its first batch. Given a training step's time (``--step-seconds``, or
``--step-json`` written by ``train_step.py --json``), the step consumes batch / seconds images per second,
and keeping up takes ceil(that / per-process rate) worker processes.

``--backend device`` (``augment.backend``): the loader only decodes and draws the views' parameters, and
the views are rendered on the training device (CUDA when present, else this CPU with all its threads):
``device_ms_per_batch`` is that rendering plus the finishing (erasing, normalisation), the median of
``--device-repeats`` calls on the last batch, against the finishing alone with the ``cpu`` backend.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import hashlib
import json
import math
import pstats
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine_info, prepared_jpegs, report, synchronize, textured_pixels
from torch.utils.data import DataLoader, Dataset

from mugs.config import Config, config_from_dict
from mugs.data.datasets import ArrayManifestDataset, ManifestColumns, open_split, read_stats
from mugs.data.loader import GlobalBatchSampler, build_finisher, build_loader

PRESETS = {"paper": "vit_small_100ep", "demo": "demo"}
MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


class Cycled(Dataset):
    """``length`` items that repeat ``dataset``: each ``(epoch, index)`` still gets its own crops."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset = dataset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", default="paper", choices=tuple(PRESETS))
    parser.add_argument("--backend", default="cpu", choices=("cpu", "device"), help="augment.backend")
    parser.add_argument("--images", type=int, default=256, help="distinct images in the pool")
    parser.add_argument("--batch", type=int, help="images per batch (default: the step's, else 64)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the single process")
    parser.add_argument("--workers", type=int, default=0, help="also time a loader with this many workers")
    parser.add_argument(
        "--device-repeats", type=int, default=3, help="timed calls of the step to the model's input"
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="N",
        help="the N costliest calls, from one more profiled pass",
    )
    parser.add_argument("--step-seconds", type=float, help="seconds of one training step of --batch images")
    parser.add_argument("--step-json", type=Path, help="train_step.py's JSON: step seconds and batch")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.step_json:
        if args.step_seconds is not None:
            parser.error("give --step-seconds or --step-json, not both")
        step = json.loads(args.step_json.read_text())
        if args.batch not in (None, step["batch"]):
            parser.error(f"--batch {args.batch} differs from the step's batch {step['batch']}")
        args.step_seconds, args.batch = step["seconds_per_iteration"], step["batch"]
    if args.batch is None:
        args.batch = 64
    return args


def pretrain_config(setting: str, batch: int, workers: int, backend: str = "cpu") -> Config:
    return config_from_dict(
        {
            "preset": PRESETS[setting],
            "augment": {"backend": backend},
            "optim": {"batch_size": batch},
            "train": {"num_workers": workers},
        }
    )


def jpeg_dataset(scratch: Path, images: int) -> tuple[Dataset, MeanStd, str]:
    """A prepared ImageFolder split of synthetic JPEGs, its channel statistics and a description."""
    prepared, source = prepared_jpegs(scratch, images)
    return open_split(prepared, "train"), read_stats(prepared), source


def idx_dataset(scratch: Path, images: int) -> tuple[Dataset, MeanStd, str]:
    """28×28 grayscale images in a gzip IDX file, read as the prepared Fashion-MNIST demo is."""
    pixels = np.stack([textured_pixels(i, 28, 28)[..., 0] for i in range(images)])
    name = "images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, pixels.ndim]) + struct.pack(">3I", *pixels.shape)
    with gzip.open(scratch / name, "wb") as f:
        f.write(header + pixels.tobytes())
    manifest = [
        {
            "path": f"{name}#{i}",
            "label": i % 10,
            "size": image.size,
            "sha256": hashlib.sha256(image.tobytes()).hexdigest(),
        }
        for i, image in enumerate(pixels)
    ]
    dataset = ArrayManifestDataset(
        scratch, ManifestColumns.from_rows(manifest), [str(c) for c in range(10)], None
    )
    mean, std = float(pixels.mean()) / 255, float(pixels.std()) / 255
    return dataset, ((mean,) * 3, (std,) * 3), f"{images} grayscale 28x28 images from an IDX array"


def loader_for(config: Config, pool: Dataset, mean_std: MeanStd, batches: int) -> DataLoader:
    cycled = Cycled(pool, batches * config.optim.batch_size)
    sampler = GlobalBatchSampler(len(cycled), config.optim.batch_size, seed=config.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # pinned batches on a GPU host
    return build_loader(config, cycled, mean_std, sampler, device=device)


def single_process_rates(
    loader: DataLoader, batches: int, repeats: int
) -> tuple[list[float], list[float], Any]:
    """Images per second of ``repeats`` passes over ``batches`` batches, each pass a fresh epoch, the
    CPU seconds per image of each pass (this process's, so other load on the machine leaves them
    alone), and the last batch.
    """
    torch.set_num_threads(1)  # as in a DataLoader worker
    loader.dataset[(0, 0)]  # first-use costs: plugins, lazily loaded arrays
    rates, cpu_seconds, batch = [], [], None
    images = batches * loader.batch_sampler.local_batch
    for epoch in range(repeats):
        loader.batch_sampler.set_position(epoch)
        iterator = iter(loader)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(iterator)
        rates.append(images / (time.perf_counter() - start))
        cpu_seconds.append((time.process_time() - start_cpu) / images)
    return rates, cpu_seconds, batch


def device_seconds_per_batch(
    config: Config, mean_std: MeanStd, batch: Any, repeats: int, device: torch.device
) -> list[float]:
    """Seconds of each of ``repeats`` calls (after one warm-up call) of the engine's step from a loader
    batch to the model's input on ``device``, synchronised."""
    finish = build_finisher(config, mean_std, device)
    finish(batch)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        finish(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def costliest_calls(loader: DataLoader, batches: int, epoch: int, top: int) -> dict[str, float]:
    """Milliseconds per image spent in the ``top`` costliest calls (their own time, callees excluded)
    over one more pass, under cProfile; the profiler slows Python code, so these figures explain the
    per-process rate rather than add up to it.
    """
    loader.batch_sampler.set_position(epoch)
    iterator = iter(loader)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(batches):
        next(iterator)
    profiler.disable()
    images = batches * loader.batch_sampler.local_batch
    own_time = {}
    for (path, _line, name), (_, _, seconds, _, _) in pstats.Stats(profiler).stats.items():
        # C calls read "<method 'resize' of 'ImagingCore' objects>" or "<built-in method torch.stack>"
        if name.startswith("<method"):
            label = name.split("'")[1]
        elif name.startswith("<built-in method "):
            label = name.removeprefix("<built-in method ").rstrip(">").split(".")[-1]
        else:
            label = f"{Path(path).stem}.{name}"
        own_time[label] = own_time.get(label, 0.0) + seconds * 1000 / images
    return dict(sorted(own_time.items(), key=lambda item: -item[1])[:top])


def batch_bytes(batch: Any) -> int:
    """Bytes of every tensor in a (nested) batch: what shared memory, pinning and the copy carry."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, (list, tuple)):
        return sum(batch_bytes(item) for item in batch)
    return 0


def worker_rate(loader: DataLoader, workers: int, batches: int) -> float:
    """Images per second once each worker delivered its first batch (process start-up excluded)."""
    iterator = iter(loader)
    for _ in range(workers):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * loader.batch_sampler.local_batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = pretrain_config(args.setting, args.batch, 0, args.backend)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    augment = config.augment
    loader_batches = args.batches * max(1, args.workers)
    with tempfile.TemporaryDirectory(prefix="mugs-augment-bench-") as scratch:
        make_pool = jpeg_dataset if args.setting == "paper" else idx_dataset
        pool, mean_std, source = make_pool(Path(scratch), args.images)
        single = loader_for(config, pool, mean_std, args.batches)
        rates, cpu_seconds, last_batch = single_process_rates(single, args.batches, args.repeats)
        bytes_per_image = batch_bytes(last_batch) / args.batch
        torch.set_num_threads(threads)  # the training process's, when the device is this CPU
        device_seconds = device_seconds_per_batch(config, mean_std, last_batch, args.device_repeats, device)
        breakdown = (
            costliest_calls(single, args.batches, args.repeats, args.breakdown) if args.breakdown else {}
        )
        loader_rate = None
        if args.workers:
            workers_config = pretrain_config(args.setting, args.batch, args.workers, args.backend)
            loader = loader_for(workers_config, pool, mean_std, args.workers + loader_batches)
            loader_rate = worker_rate(loader, args.workers, loader_batches)
    per_process = statistics.median(rates)
    result: dict[str, Any] = {
        "setting": args.setting,
        "backend": args.backend,
        "crops": f"4x{augment.global_size} (2 teacher, 2 student) + {augment.n_local}x{augment.local_size}",
        "source": source,
        "batch": args.batch,
        "per_process_images_per_second": per_process,
        "per_process_ms_per_image": 1000 / per_process,
        "per_process_cpu_ms_per_image": 1000 * statistics.median(cpu_seconds),
        "per_process_passes": f"{args.repeats} x {args.batches * args.batch} images",
        "loader_bytes_per_image": bytes_per_image,
        "render_device": device.type,
        "render_device_threads": threads if device.type == "cpu" else None,
        "device_ms_per_batch": 1000 * statistics.median(device_seconds),
        "device_ms_per_image": 1000 * statistics.median(device_seconds) / args.batch,
        "loader_workers": args.workers,
        "loader_images_per_second": loader_rate,
        "step_seconds": args.step_seconds,
    }
    if args.step_seconds:
        needed = args.batch / args.step_seconds
        result["images_per_second_needed"] = needed
        result["workers_needed"] = math.ceil(needed / per_process)
        result["loader_bytes_per_second_needed"] = needed * bytes_per_image
        if loader_rate is not None:
            result["loader_keeps_up"] = loader_rate >= needed
    result.update({f"profiled_ms_per_image_in_{label}": ms for label, ms in breakdown.items()})
    result.update(machine_info(torch.device("cpu")))
    report(f"Multi-crop augmentation ({args.setting})", result, args.json)
    return result


if __name__ == "__main__":
    main()
