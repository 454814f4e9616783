"""Shared setup of the workflow tests: a throw-away git repository holding this working tree with a tiny
parameter file, and helpers to run Snakemake, DVC and ``mugs`` in it and read what they produced.

The repository is a copy of the files git tracks or would track here (so uncommitted edits are tested
too), committed in a fresh ``git init``; clones of it stand for "a fresh clone of the project".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mugs.config import merge_values

REPO = Path(__file__).resolve().parents[1]
RUN = "mugs"
PROTOCOLS = ("knn", "linear", "fewshot")
# the baselines' metrics files: the run's networks at their random initialisation (knn, linear) and raw pixels
RANDOM_INIT = f"results/{RUN}/random-init"
RAW_PIXELS = "results/baselines/raw-pixels"
BASELINE_METRICS = (f"{RANDOM_INIT}/knn.json", f"{RANDOM_INIT}/linear.json", f"{RAW_PIXELS}/knn.json")
# plain progress lines every this many seconds (`--config progress_every=...`): several per tiny job
PROGRESS_EVERY_S = 0.3

# A few seconds of pretraining on 2 cores: 270 training images (30 per class), a 2-block ViT, tiny heads
# and queues, 2 epochs of 8 iterations, one checkpoint kept per epoch, a log line every 2 (so that
# pretraining's progress lines move); evaluations cut to one setting each.
TINY: dict[str, dict[str, Any]] = {
    "model": {"depth": 2, "hidden_dim": 64, "out_dim": 32, "predictor_hidden_dim": 64, "group_out_dim": 64},
    "loss": {"instance_queue_size": 64, "local_group_queue_size": 64, "local_group_knn_top_n": 4},
    "optim": {"epochs": 2, "batch_size": 32, "warmup_epochs": 1},
    "data": {"max_per_class": 30, "train_subset": None, "workers": 1},
    # one torch thread: on 2 busy cores, two threads spinning on tiny tensors run ~50x slower
    "train": {"num_workers": 0, "keep_every_epochs": 1, "checkpoint_every": 0, "threads": 1, "log_every": 2},
    "evaluate": {
        "num_workers": 0,
        "knn_k": [5, 10],
        "selection_k": 5,
        "linear_epochs": 2,
        "linear_n_last_blocks": 1,
        "linear_lrs": [0.001, 0.01],
        "linear_weight_decays": [0.0],
        "fewshot_fractions": [0.1],
        "fewshot_c": [1.0],
        "fewshot_max_iter": 100,
    },
}
# Snakemake gives each job as many threads (OMP_NUM_THREADS) as cpus_per_task says.
TINY_RESOURCES = {"cpus_per_task": 1}


def tool_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's tools (snakemake, dvc, mugs) first on PATH and one BLAS thread."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    # git commits inside the test repositories must work without a global git identity
    env.update(
        GIT_AUTHOR_NAME="mugs tests",
        GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="mugs tests",
        GIT_COMMITTER_EMAIL="tests@example.invalid",
        COLUMNS="200",
        DVC_NO_ANALYTICS="1",
    )
    env.update(extra)
    return env


def sh(
    *command: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd``; on failure raise with its output, so the test log shows why."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env or tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(map(str, command))}` in {cwd} exited with {done.returncode}\n"
            f"--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}"
        )
    return done


def worktree_files(repo: Path = REPO) -> list[str]:
    """Paths that git tracks or would track in ``repo`` (deleted ones left out)."""
    listed = sh("git", "ls-files", "-z", "-co", "--exclude-standard", cwd=repo).stdout.split("\0")
    return sorted(path for path in listed if path and (repo / path).is_file())


def copy_worktree(dest: Path, repo: Path = REPO) -> Path:
    """Copy the working tree's files into ``dest`` and commit them there as a new git repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in worktree_files(repo):
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / path, target)
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    git_commit(dest, "copy of the working tree")
    return dest


def git_commit(repo: Path, message: str, *paths: str) -> None:
    sh("git", "add", "-A", *paths, cwd=repo)
    sh("git", "commit", "-q", "--allow-empty", "-m", message, cwd=repo)


def clone(source: Path, dest: Path, dvc_remote: Path | None = None) -> Path:
    """``git clone`` of ``source``; with ``dvc_remote``, that folder becomes its default DVC remote
    (in ``.dvc/config.local``, so the committed default under ~/.cache is never touched).
    """
    sh("git", "clone", "-q", source, dest, cwd=source.parent)
    if dvc_remote is not None:
        sh("dvc", "remote", "add", "--local", "-d", "-f", "tests", dvc_remote, cwd=dest)
    return dest


def read_params(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "params.yaml").read_text())


def write_params(repo: Path, values: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def update_params(repo: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``repo``'s params.yaml; returns the values before the change."""
    before = read_params(repo)
    write_params(repo, merge_values(before, update))
    return before


def tiny_params(repo: Path, **extra: dict[str, Any]) -> None:
    """Turn ``repo``'s params.yaml into the tiny test pipeline (one run, knn + linear + fewshot)."""
    values = merge_values(read_params(repo), {**TINY, "protocols": list(PROTOCOLS), "runs": {RUN: {}}})
    values["resources"] = {"default": {**values["resources"].get("default", {}), **TINY_RESOURCES}}
    write_params(repo, merge_values(values, extra))


def expected_outputs(run: str = RUN, protocols: tuple[str, ...] = PROTOCOLS) -> list[str]:
    """Every file ``all`` must leave behind for one run."""
    return [
        "results/data/summary.json",
        "results/data/manifest-train.jsonl",
        "results/data/manifest-val.jsonl",
        "results/data/manifest-test.jsonl",
        f"results/{run}/pretrain/DONE",
        f"results/{run}/pretrain/checkpoints/latest.pt",
        f"results/{run}/pretrain/log.jsonl",
        f"results/{run}/eval/selection.json",
        f"results/{run}/eval/selected.pt",
        *(f"results/{run}/eval/{protocol}.json" for protocol in protocols),
        f"results/{run}/random-init/checkpoint.pt",
        f"results/{run}/random-init/knn.json",
        f"results/{run}/random-init/linear.json",
        f"{RAW_PIXELS}/knn.json",
        "results/report/summary.md",
        "results/report/summary.json",
        "results/report/curves.png",
        "results/report/knn_checkpoints.png",
        "results/report/accuracy.png",
        "results/report/tsne.png",
        f"results/report/attention-{run}.png",
        f"results/report/curves/{run}.csv",
    ]


def assert_outputs(repo: Path, run: str = RUN, protocols: tuple[str, ...] = PROTOCOLS) -> None:
    """Every expected output exists and is not empty; the metrics are what their protocol writes."""
    missing = [path for path in expected_outputs(run, protocols) if not (repo / path).is_file()]
    assert not missing, f"missing outputs in {repo}: {missing}"
    outputs = [path for path in expected_outputs(run, protocols) if not path.endswith("/DONE")]
    empty = [path for path in outputs if (repo / path).stat().st_size == 0]
    assert not empty, f"empty outputs in {repo}: {empty}"
    eval_dir = repo / "results" / run / "eval"
    selection = json.loads((eval_dir / "selection.json").read_text())
    assert selection["policy"] == "best_knn"
    assert len(selection["scores"]) == 2  # one kept checkpoint per epoch
    for protocol in protocols:
        metrics = json.loads((eval_dir / f"{protocol}.json").read_text())
        assert metrics["evaluation"] == protocol
        assert metrics["provenance"]["checkpoint_sha256"] == file_sha256(eval_dir / "selected.pt")
        assert "timing" in metrics
    knn = json.loads((eval_dir / "knn.json").read_text())
    assert set(knn["fine"]) == {"5", "10"}
    # 10 balanced classes: a trained backbone's kNN must beat chance clearly, even after 16 iterations
    assert knn["fine"]["10"]["top1"] > 0.2
    random_init = repo / "results" / run / "random-init"
    for protocol in ("knn", "linear"):
        metrics = json.loads((random_init / f"{protocol}.json").read_text())
        assert metrics["evaluation"] == protocol
        assert metrics["provenance"]["checkpoint_sha256"] == file_sha256(random_init / "checkpoint.pt")
    pixels = json.loads((repo / RAW_PIXELS / "knn.json").read_text())
    assert set(pixels["fine"]) == {"5", "10"} and pixels["provenance"]["checkpoint"] is None
    assert pixels["fine"]["10"]["top1"] > 0.2
    summary = json.loads((repo / "results/report/summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [run]
    # the baselines are rows of the summary and of the accuracy figure, which draws summary.json's rows
    baselines = {b["name"]: b["metrics"] for b in summary["baselines"]}
    assert list(baselines) == [f"{run} at random init", "raw pixels"]
    # the report shows k=20 or, when it was not evaluated, the smallest k
    random_init_knn = json.loads((random_init / "knn.json").read_text())
    assert baselines[f"{run} at random init"]["knn_fine"] == random_init_knn["fine"]["5"]["top1"]
    assert baselines[f"{run} at random init"]["linear_fine"] is not None
    assert baselines["raw pixels"]["knn_fine"] == pixels["fine"]["5"]["top1"]
    table = (repo / "results/report/summary.md").read_text()
    assert f"| {run} at random init (baseline) |" in table and "| raw pixels (baseline) |" in table


def comparable_metrics(path: Path) -> dict[str, Any]:
    """A metrics file without what legitimately differs between two runs: timings and the timestamp."""
    values = json.loads(path.read_text())
    values.pop("timing", None)
    values["provenance"].pop("created", None)
    return values


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (a file or a folder), keyed by path below ``root``'s parent."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(path.relative_to(root.parent)): file_sha256(path) for path in files}
