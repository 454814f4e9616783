"""What the benchmark scripts share: their device options, the machine's description, peak memory,
synthetic JPEG trees (and their prepared splits), and the figures printed as a table and written as
JSON.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``; ``_tree`` then
puts the checkout holding it first, so that its ``mugs`` is the one measured (and recorded, as the
``code`` of :func:`machine_info`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import _tree
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import mugs
from mugs.config import DataConfig
from mugs.data.prepare import run_prepare
from mugs.evaluation.metrics_io import git_commit

JPEG_SIZE = (500, 375)  # width, height: about ImageNet's average


def add_device_arguments(parser: argparse.ArgumentParser, *, threads: int | None = None) -> None:
    """``--device`` (cpu or cuda), ``--threads`` (torch intra-op threads; default ``threads``, None
    leaving torch's choice) and ``--json`` (where the figures go)."""
    default = threads or "torch's choice"
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=threads, help=f"torch intra-op threads (default: {default})"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")


def add_model_arguments(parser: argparse.ArgumentParser, crop: str) -> None:
    """``--arch``, ``--depth``, ``--patch-size`` and ``--image-size`` (the ``crop``, augment.global_size)."""
    parser.add_argument("--arch", default="vit_small", choices=("vit_tiny", "vit_small", "vit_base"))
    parser.add_argument("--depth", type=int, help="blocks (default: the arch's)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224, help=f"{crop} (augment.global_size)")


def chosen_device(args: argparse.Namespace) -> torch.device:
    """The ``--device`` of ``args``, after setting torch's thread count to ``--threads`` if given."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def cpu_model() -> str:
    # platform.processor() is empty or just the architecture on most Linux systems
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device, CPU model, the cores this process may use, torch's version, and the code measured: the
    ``mugs`` package's directory and its git commit (None outside a git checkout).
    """
    source = Path(mugs.__file__).resolve().parent
    if source.parent != _tree.ROOT:
        raise RuntimeError(f"measuring {source}, not the checkout of these scripts ({_tree.ROOT})")
    return {
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "code": str(source),
        "git": git_commit(source),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_resident() -> None:
    """Restart the peak resident set at the current size, where the kernel allows it (Linux >= 4.0)."""
    # where it refuses, the peak also covers what ran before
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_bytes() / 2**20


class TimedPeak:
    """Times a ``with`` block and the peak memory it adds: CUDA memory allocated by torch, or on CPU
    the process's peak resident set above its size on entry (the peak restarted there where Linux
    allows). After the block: ``start`` (``time.perf_counter``), ``seconds``, ``peak_mib``, ``kind``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> TimedPeak:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_resident()
        self.baseline = resident_bytes()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            peak, self.kind = torch.cuda.max_memory_allocated(self.device), "CUDA allocated"
        else:
            peak, self.kind = max(0, peak_resident_bytes() - self.baseline), "process RSS above baseline"
        self.peak_mib = peak / 2**20


def textured_pixels(seed: int, width: int, height: int, noise: float = 12) -> np.ndarray:
    """``[height, width, 3]`` uint8: a seeded colour gradient plus noise of std ``noise``, so JPEGs get a
    realistic size."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width)[None, :, None]
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = low + (high - low) * ramp + rng.normal(0, noise, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, seed: int, size: tuple[int, int], noise: float = 12) -> int:
    """One JPEG of ``textured_pixels`` at quality 90; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(textured_pixels(seed, *size, noise)).save(path, quality=90)
    return path.stat().st_size


def make_tree(
    root: Path, images: int, classes: int, size: tuple[int, int] = (64, 64), workers: int = 1
) -> int:
    """``root/train/class_XXX/YYYYY.jpg`` of ``size`` (width, height), written by ``workers`` processes;
    returns the total bytes written."""
    paths = [root / "train" / f"class_{i % classes:03d}" / f"{i:05d}.jpg" for i in range(images)]
    jobs = (paths, range(images), [size] * images)
    if workers <= 1:
        return sum(map(write_jpeg, *jobs))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(write_jpeg, *jobs, chunksize=16))


def prepared_jpegs(scratch: Path, images: int, workers: int = 1) -> tuple[Path, str]:
    """``images`` training JPEGs of ``JPEG_SIZE`` (one class) prepared by ``mugs prepare`` under
    ``scratch``, and their description; one image more is made, as ``mugs prepare`` holds at least one
    out for validation. ``workers`` processes generate and prepare them."""
    root, prepared = scratch / "images", scratch / "prepared"
    size = make_tree(root, images + 1, classes=1, size=JPEG_SIZE, workers=workers)
    config = DataConfig(
        source="imagefolder", root=str(root), prepared_dir=str(prepared), val_fraction=1e-6, workers=workers
    )
    run_prepare(config, progress=False)
    width, height = JPEG_SIZE
    kib = size / (images + 1) / 1024
    return prepared, f"{images} JPEGs {width}x{height} ({kib:.0f} KiB each) via mugs prepare"


def report(title: str, figures: dict[str, Any], json_path: Path | None) -> None:
    """Print ``figures`` as a two-column table; with ``json_path``, also write them there."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=1) + "\n")
