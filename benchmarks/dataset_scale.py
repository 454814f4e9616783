"""A dataset of ImageNet's size: what `mugs prepare`, the pipeline's checks and the training dataset cost.

    python benchmarks/dataset_scale.py [--images 40000] [--classes 100] [--tree DIR] [--workers auto] \\
        [--rows 1281167] [--imagenet 1281167] [--json PATH]

1. An ImageFolder tree of ``--images`` JPEGs like ImageNet's (sides drawn from 300 to 500 px, about
   100 KB each, ``--classes`` classes), generated deterministically, in a temporary directory or in
   ``--tree`` (kept there and reused by later runs: generating 40,000 takes minutes).
2. ``mugs prepare`` on it in a fresh process, cold (no cache: every file decoded) and warm (nothing
   changed): wall seconds and CPU seconds of the process and its workers, and whether the workers
   imported torch.
3. ``snakemake -n all`` and ``dvc status`` in a scratch copy of the project whose ``data.root`` is the
   tree, after the warm prepare (:func:`versioning` is where the versioning of the prepared data is
   timed, when the project defines one).
4. The training dataset (``open_split``) of a synthetic manifest of ``--rows`` rows (ImageNet's train
   split by default), in a fresh process: seconds, resting size and the peak above the process's
   size before the call.

Each per-file figure is also extrapolated linearly to ``--imagenet`` files (ImageNet-1k's train split).
CPU seconds, not wall seconds, are the figures to compare on a loaded machine; the load average is
recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import _tree
import numpy as np
import torch
import yaml
from _common import machine_info, report, write_jpeg

IMAGENET_TRAIN = 1_281_167
NOISE = 36  # the noise std that gives JPEGs of 300-500 px about ImageNet's 100 KB at quality 90


def _write_one(root: Path, index: int, classes: int) -> int:
    width, height = (int(v) for v in np.random.default_rng([7, index]).integers(300, 501, 2))
    path = root / "train" / f"class_{index % classes:03d}" / f"{index:07d}.jpg"
    return write_jpeg(path, index, (width, height), NOISE)


def imagenet_like_tree(root: Path, images: int, classes: int, workers: int) -> int:
    """``root/train/class_XXX/NNNNNNN.jpg``: ``images`` JPEGs in ``classes`` classes; returns their total
    bytes. A tree already complete for these counts (its ``.generated`` record says so) is reused."""
    record = root / ".generated"
    wanted = {"images": images, "classes": classes, "noise": NOISE}
    if record.is_file():
        done = json.loads(record.read_text())
        if {key: done.get(key) for key in wanted} == wanted:
            return int(done["bytes"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    jobs = ([root] * images, range(images), [classes] * images)
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        total = sum(pool.map(_write_one, *jobs, chunksize=64))
    record.write_text(json.dumps({**wanted, "bytes": total}))
    return total


# runs in a fresh interpreter, as `mugs prepare` does: no torch, and its CPU time is its own
PREPARE = """
import json, resource, sys, time
from multiprocessing import forkserver
from mugs.config import DataConfig
from mugs.data.prepare import run_prepare
start = time.perf_counter()
summary = run_prepare(DataConfig(**json.loads(sys.argv[1])), progress=False)
wall = time.perf_counter() - start
# the workers are the fork server's children: stopping it makes their CPU time count among ours
forkserver._forkserver._stop()
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu = sum(u.ru_utime + u.ru_stime for u in usage)
# VmHWM: ru_maxrss would also count the benchmark's own memory, from before this process's exec
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"wall": wall, "cpu": cpu, "decoded": summary.decoded, "cached": summary.cached,
    "torch": "torch" in sys.modules, "peak": peak, "worker_peak": usage[1].ru_maxrss * 1024}))
"""

# a synthetic manifest of ImageNet's shape read into the training dataset, in a fresh interpreter
DATASET = """
import json, resource, sys, time
from pathlib import Path
from mugs.data.datasets import open_split
def rss(): return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) here (Linux >= 4.0)
before, start, cpu = rss(), time.perf_counter(), time.process_time()
dataset = open_split(sys.argv[1], "train")
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"rows": len(dataset), "seconds": seconds, "cpu": cpu, "rest": rss() - before,
    "peak": peak - before}))
"""


def run_python(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` with ``args`` in a fresh interpreter that imports this checkout's ``mugs``; its JSON."""
    env = {**os.environ, "PYTHONPATH": str(_tree.ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def synthetic_manifest(prepared: Path, root: Path, rows: int, classes: int) -> None:
    """A prepared directory whose train split lists ``rows`` files of ImageNet's naming (not on disk)."""
    prepared.mkdir(parents=True, exist_ok=True)
    names = [f"n{c:08d}" for c in range(classes)]
    summary = {"source": "imagefolder", "root": str(root), "splits": {"train": rows}}
    (prepared / "summary.json").write_text(json.dumps(summary))
    (prepared / "classes.json").write_text(json.dumps({"classes": names, "coarse_classes": None}))
    with open(prepared / "manifest-train.jsonl", "w") as f:
        for i in range(rows):
            name = names[i % classes]
            path, digest = f"train/{name}/{name}_{i}.JPEG", f"{i:064x}"
            f.write(
                f'{{"path":"{path}","label":{i % classes},"coarse":null,"size":110000,"sha256":"{digest}"}}\n'
            )


def scratch_project(project: Path, tree: Path) -> None:
    """A copy of this project's workflow whose parameters prepare ``tree`` (ImageFolder) into results/data,
    with its dvc.yaml generated and DVC initialised."""
    for name in ("Snakefile", "workflow", "profiles", "params.yaml"):
        source = _tree.ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(source="imagefolder", root=str(tree), prepared_dir="results/data", workers="auto")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tools = Path(sys.executable).parent
    for command in ([tools / "mugs", "dvc-yaml"], [tools / "dvc", "init", "--no-scm", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True, env=tool_env())


def tool_env() -> dict[str, str]:
    # this interpreter's tools first, and no DVC analytics call home
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}


def timed(command: str, project: Path) -> float:
    """Wall seconds of the shell ``command`` in ``project`` (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=project, env=tool_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{command}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def versioning(project: Path, command: str | None) -> dict[str, Any]:
    """The hook for versioning the prepared data after ``prepare``: ``--versioning CMD`` is timed in the
    scratch project (e.g. the command that records the prepared manifests with DVC); none by default."""
    if not command:
        return {"versioning_command": None}
    return {"versioning_command": command, "versioning_seconds": timed(command, project)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--tree", type=Path, help="generate (or reuse) the JPEGs here; default: a temporary one"
    )
    parser.add_argument("--workers", default="auto", help="data.workers of mugs prepare")
    parser.add_argument("--rows", type=int, default=IMAGENET_TRAIN, help="rows of the synthetic manifest")
    parser.add_argument("--manifest-classes", type=int, default=1000)
    parser.add_argument("--imagenet", type=int, default=IMAGENET_TRAIN, help="files to extrapolate to")
    parser.add_argument("--versioning", help="a command that versions the prepared data, timed after prepare")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    scale = args.imagenet / args.images
    figures: dict[str, Any] = {
        "images": args.images,
        "classes": args.classes,
        "extrapolated_to": args.imagenet,
    }
    with tempfile.TemporaryDirectory(prefix="mugs-scale-") as tmp:
        scratch = Path(tmp)
        tree = args.tree or scratch / "images"
        start = time.perf_counter()
        size = imagenet_like_tree(tree, args.images, args.classes, len(os.sched_getaffinity(0)))
        figures["generate_seconds"] = time.perf_counter() - start
        figures["kb_per_image"] = size / args.images / 1000
        project = scratch / "project"
        project.mkdir()
        scratch_project(project, tree)
        config = json.dumps(
            {
                "source": "imagefolder",
                "root": str(tree),
                "prepared_dir": str(project / "results/data"),
                "workers": workers,
            }
        )
        figures["load_average_before"] = os.getloadavg()[0]
        for kind in ("cold", "warm"):
            run = run_python(PREPARE, config)
            files = run["decoded"] + run["cached"]
            figures[f"prepare_{kind}_decoded"] = run["decoded"]
            figures[f"prepare_{kind}_wall_seconds"] = run["wall"]
            figures[f"prepare_{kind}_cpu_seconds"] = run["cpu"]
            figures[f"prepare_{kind}_cpu_ms_per_image"] = 1000 * run["cpu"] / files
            figures[f"prepare_{kind}_imagenet_cpu_seconds"] = run["cpu"] * scale
            figures[f"prepare_{kind}_imagenet_wall_seconds"] = run["wall"] * scale
            figures[f"prepare_{kind}_peak_mb"] = run["peak"] / 1e6
            figures[f"prepare_{kind}_worker_peak_mb"] = run["worker_peak"] / 1e6
        figures["prepare_imported_torch"] = run["torch"]
        figures.update(versioning(project, args.versioning))
        for name, command in (
            ("snakemake_dry_run", "snakemake --profile profiles/local -n all"),
            ("dvc_status", "dvc status"),
        ):
            figures[f"{name}_seconds"] = timed(command, project)
            figures[f"{name}_imagenet_seconds"] = figures[f"{name}_seconds"] * scale
        synthetic_manifest(scratch / "manifest", tree, args.rows, args.manifest_classes)
        built = run_python(DATASET, str(scratch / "manifest"))
        figures["load_average_after"] = os.getloadavg()[0]
    rows_scale = args.imagenet / args.rows
    figures.update(
        dataset_rows=built["rows"],
        dataset_seconds=built["seconds"],
        dataset_cpu_seconds=built["cpu"],
        dataset_resting_mb=built["rest"] / 1e6,
        dataset_peak_above_rest_mb=(built["peak"] - built["rest"]) / 1e6,
        dataset_imagenet_peak_above_rest_mb=(built["peak"] - built["rest"]) / 1e6 * rows_scale,
        **machine_info(torch.device("cpu")),
    )
    report("A dataset of ImageNet's size", figures, args.json)
    return figures


if __name__ == "__main__":
    main()
