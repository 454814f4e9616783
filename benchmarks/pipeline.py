"""Pipeline overhead: seconds of ``snakemake -n all`` and ``dvc status`` on a project, and what they say.

    python benchmarks/pipeline.py [--root .] [--profile profiles/local] [--configfile FILE ...]
        [--repeats 3] [--json PATH]

Both commands only read the workflow's state: the dry run plans the jobs of target ``all``, ``dvc status``
compares the stages with ``dvc.lock``. On a finished run both should have nothing to do; the figures
are how long a user waits to learn that (median and min of ``--repeats`` runs; the first run also pays
for cold caches). Neither touches the results, though Snakemake refreshes its I/O cache under
``.snakemake/`` and DVC takes its lock under ``.dvc/tmp/``. Without ``dvc.lock`` (stages never run by
DVC, e.g. a run made by Snakemake) DVC reports every stage as changed; the counts say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info, report

from mugs.testing.workflow import planned_jobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--profile", default="profiles/local", help="Snakemake profile, relative to --root")
    parser.add_argument(
        "--configfile", nargs="+", default=[], help="more parameter files, as the run was made with"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def timed_runs(
    command: list[str], root: Path, repeats: int
) -> tuple[list[float], subprocess.CompletedProcess]:
    """Seconds of each of ``repeats`` runs of ``command`` in ``root``, and the last run's output."""
    # the tools of this interpreter's environment first, and no DVC analytics call home
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` in {root} exited with {done.returncode}:\n{done.stderr}")
    return times, done


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    root = args.root.resolve()
    snakemake_times, dry_run = timed_runs(
        ["snakemake", "--profile", args.profile, "-n", "all"]
        + (["--configfile", *args.configfile] if args.configfile else []),
        root,
        args.repeats,
    )
    jobs = planned_jobs(dry_run.stdout + dry_run.stderr)
    dvc_times, status = timed_runs(["dvc", "status", "--json"], root, args.repeats)
    changed = json.loads(status.stdout or "{}")
    result: dict[str, Any] = {
        "root": str(root),
        "snakemake_dry_run_seconds": statistics.median(snakemake_times),
        "snakemake_dry_run_seconds_min": min(snakemake_times),
        "snakemake_jobs": sum(jobs.values()),
        "snakemake_jobs_by_rule": ", ".join(f"{rule} {n}" for rule, n in jobs.items()) or "none",
        "dvc_status_seconds": statistics.median(dvc_times),
        "dvc_status_seconds_min": min(dvc_times),
        "dvc_lock": (root / "dvc.lock").is_file(),
        "dvc_clean": not changed,
        "dvc_changed_stages": len(changed),
        "repeats": args.repeats,
        **machine_info(torch.device("cpu")),
    }
    report("Pipeline overhead", result, args.json)
    return result


if __name__ == "__main__":
    main()
