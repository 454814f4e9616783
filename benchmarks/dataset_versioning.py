"""What versioning a dataset costs when its version is its manifest, extrapolated to ImageNet-1k.

    python benchmarks/dataset_versioning.py [--images 5000] [--classes 100] [--repeats 3] [--json PATH]

Makes a project (a copy of this checkout's tracked files, ``git init``) whose ``data.root`` is a
generated tree of ``--images`` 64×64 JPEGs outside it, runs ``dvc repro prepare`` once, then times
with nothing changed (median of ``--repeats``):

- the stat pass that fingerprints the tree (``mugs.data.state.data_state``, no file read), per file;
- ``snakemake -n all`` (it refreshes the fingerprint while parsing) and ``dvc repro prepare`` (runs the
  always-changed ``data_state`` stage, skips ``prepare``), each checked to plan no ``prepare``;
- ``dvc status`` in the same project;
- ``dvc add`` of a synthetic prepared directory of ImageNet's size (1,281,167 + 50,000 manifest rows
  of the real format), so the versioning step is measured at full size, not extrapolated; then
  ``dvc status`` with it tracked.

The ImageNet figures add the stat pass's per-file time over the missing files to the measured totals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import machine_info, make_tree, report
from pipeline import timed_runs

from mugs.config import DataConfig
from mugs.data.state import data_state
from mugs.testing.workflow import planned_jobs

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--imagenet-rows", type=int, default=IMAGENET_TRAIN, help="train rows of the synthetic manifest"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def project(dest: Path, data_root: Path) -> Path:
    """A git repository holding this checkout's tracked files, its params reading ``data_root``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"].update(source="imagefolder", root=str(data_root), max_per_class=None, workers=2)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    timed_runs(["mugs", "dvc-yaml"], dest, 1)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "benchmark project"], cwd=dest, check=True)
    return dest


def imagenet_manifests(dest: Path, train: int, val: int) -> int:
    """A prepared directory of ImageNet's size: manifests in ``mugs prepare``'s format; returns bytes."""
    dest.mkdir(parents=True)
    for split, rows in (("train", train), ("val", val)):
        with open(dest / f"manifest-{split}.jsonl", "w") as f:
            for i in range(rows):
                label = i % 1000
                row = {
                    "path": f"{split}/n{label:08d}/n{label:08d}_{i}.JPEG",
                    "label": label,
                    "coarse": None,
                    "size": 110_000 + i % 5000,
                    "sha256": f"{i:064x}",
                }
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return sum(path.stat().st_size for path in dest.iterdir())


def median(times: list[float]) -> float:
    return statistics.median(times)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_with_cpu(command: list[str], root: Path, repeats: int) -> tuple[float, float, str]:
    """Median wall seconds of ``command`` over ``repeats`` runs, its mean CPU seconds (user + system,
    which a loaded machine inflates less than the wall time) and the last run's output."""
    before = children_cpu_seconds()
    times, done = timed_runs(command, root, repeats)
    return median(times), (children_cpu_seconds() - before) / repeats, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mugs-versioning-bench-") as tmp:
        data_root = Path(tmp) / "datasets" / "tree"
        make_tree(data_root, args.images, args.classes, workers=2)
        repo = project(Path(tmp) / "project", data_root)
        timed_runs(["dvc", "repro", "prepare"], repo, 1)

        config = DataConfig(source="imagefolder", root=str(data_root))
        stat_times, stat_cpu = [], []
        for _ in range(args.repeats):
            start, cpu = time.perf_counter(), time.process_time()
            data_state(config)
            stat_times.append(time.perf_counter() - start)
            stat_cpu.append(time.process_time() - cpu)
        per_file = median(stat_times) / args.images

        dry, dry_cpu, output = timed_with_cpu(
            ["snakemake", "--profile", "profiles/local", "-n", "all"], repo, args.repeats
        )
        planned = planned_jobs(output)
        repro, repro_cpu, output = timed_with_cpu(["dvc", "repro", "prepare"], repo, args.repeats)
        if "prepare" in planned or "Running stage 'prepare'" in output:
            raise SystemExit(f"prepare would rerun on an unchanged tree: {planned}\n{output}")
        status, status_cpu, _ = timed_with_cpu(["dvc", "status"], repo, args.repeats)

        manifests = repo / "imagenet-prepared"  # a stand-in for results/data at ImageNet size
        size = imagenet_manifests(manifests, args.imagenet_rows, IMAGENET_VAL)
        add, add_cpu, _ = timed_with_cpu(["dvc", "add", str(manifests.relative_to(repo))], repo, 1)
        status_imagenet, status_imagenet_cpu, _ = timed_with_cpu(["dvc", "status"], repo, args.repeats)

    missing = IMAGENET_TRAIN + IMAGENET_VAL - args.images
    figures: dict[str, Any] = {
        "images": args.images,
        "load_average_1min": os.getloadavg()[0],
        "stat_pass_seconds": median(stat_times),
        "stat_pass_cpu_seconds": median(stat_cpu),
        "stat_pass_us_per_file": per_file * 1e6,
        "snakemake_dry_run_all_seconds": dry,
        "snakemake_dry_run_all_cpu_seconds": dry_cpu,
        "snakemake_planned_jobs": sum(planned.values()),
        "dvc_repro_prepare_unchanged_seconds": repro,
        "dvc_repro_prepare_unchanged_cpu_seconds": repro_cpu,
        "dvc_status_seconds": status,
        "dvc_status_cpu_seconds": status_cpu,
        "imagenet_manifest_rows": args.imagenet_rows + IMAGENET_VAL,
        "imagenet_manifest_mib": size / 2**20,
        "imagenet_dvc_add_manifests_seconds": add,
        "imagenet_dvc_add_manifests_cpu_seconds": add_cpu,
        "imagenet_dvc_status_seconds": status_imagenet,
        "imagenet_dvc_status_cpu_seconds": status_imagenet_cpu,
        "imagenet_stat_pass_seconds": per_file * (IMAGENET_TRAIN + IMAGENET_VAL),
        "imagenet_stat_pass_cpu_seconds": median(stat_cpu) / args.images * (IMAGENET_TRAIN + IMAGENET_VAL),
        "imagenet_snakemake_dry_run_all_seconds": dry + per_file * missing,
        "imagenet_dvc_repro_unchanged_seconds": repro + per_file * missing,
        "machine": machine_info(torch.device("cpu")),
    }
    report("Dataset versioning (the manifest is the version)", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
