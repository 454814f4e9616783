"""Metrics files with provenance: what produced a number, so that it can be rebuilt exactly.

Every metrics JSON carries a ``provenance`` block (git commit, config digest, data hash, checkpoint
hash, package versions, container digest, timestamp). Wall-clock figures go under the single key
``timing`` so that two runs can be compared with that key dropped.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mugs.config import Config
from mugs.files import atomic_write_text, file_sha256

if TYPE_CHECKING:
    from mugs.evaluation.features import FeatureSet

__all__ = [
    "data_hash",
    "git_commit",
    "package_versions",
    "provenance",
    "run_evaluation",
    "write_metrics",
]


def git_commit(directory: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``directory`` (default: the package source).

    ``None`` when it is not inside a git checkout or git is missing (e.g. an installed wheel).
    """
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def data_hash(config: Config, dvc_file: str | Path = "data.dvc") -> dict[str, str] | None:
    """The dataset's identity: the ``md5`` that DVC recorded in ``dvc_file`` for the output holding
    ``data.root`` (when that file exists and tracks it), and the SHA-256 of the prepared manifests
    (``manifest-*.jsonl`` in name order, which also pins the splits); ``None`` when neither is found.
    """
    found: dict[str, str] = {}
    dvc_file = Path(dvc_file)
    if dvc_file.is_file():
        root = Path(config.data.root).resolve()
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []:
            tracked = (dvc_file.parent / str(out.get("path", ""))).resolve()
            if "md5" in out and (root == tracked or tracked in root.parents):
                found["dvc_md5"] = out["md5"]
                found["dvc_file"] = str(dvc_file)
    manifests = sorted(Path(config.data.prepared_dir).glob("manifest-*.jsonl"))
    if manifests:
        digest = hashlib.sha256()
        for path in manifests:
            digest.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\n")
        found["manifests_sha256"] = digest.hexdigest()
    return found or None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, distribution in (
        ("torch", "torch"),
        ("torchvision", "torchvision"),
        ("timm", "timm"),
        ("numpy", "numpy"),
        ("scikit-learn", "scikit-learn"),
        ("mugs", "mugs-pipeline"),
    ):
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(config: Config, checkpoint: str | Path | None) -> dict[str, Any]:
    """Everything that identifies how a metric was produced (see the module docstring)."""
    return {
        "git": git_commit(),
        "config_sha256": config.digest(),
        "data": data_hash(config),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
        "packages": package_versions(),
        "container_digest": os.environ.get("MUGS_CONTAINER_DIGEST") or None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_metrics(
    path: str | Path,
    metrics: dict[str, Any],
    *,
    config: Config,
    checkpoint: str | Path | None,
    timing: dict[str, float] | None = None,
) -> Path:
    """Write ``{**metrics, "provenance": ..., "timing": ...}`` as JSON, atomically (temp file + rename)."""
    for reserved in ("provenance", "timing"):
        if reserved in metrics:
            raise ValueError(f"metrics must not contain the reserved key {reserved!r}")
    payload = {**metrics, "provenance": provenance(config, checkpoint), "timing": dict(timing or {})}
    return atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")


def run_evaluation(
    config: Config,
    out: str | Path,
    *,
    checkpoint: str | Path | None,
    features: Callable[[], Sequence[FeatureSet]],
    header: dict[str, Any],
    evaluate: Callable[[Sequence[FeatureSet]], dict[str, Any]],
    timing_key: str,
) -> dict[str, Any]:
    """The steps every evaluation command shares: ``features()`` (loading ``checkpoint``'s network, or
    the cache), ``evaluate`` on them, and the metrics JSON ``out``, ``{**header, **evaluate(...)}`` with
    provenance and the two durations (``features_seconds`` and ``timing_key``). Returns the metrics
    without provenance."""
    started = time.perf_counter()
    feature_sets = features()
    extracted = time.perf_counter()
    metrics = {**header, **evaluate(feature_sets)}
    timing = {"features_seconds": extracted - started, timing_key: time.perf_counter() - extracted}
    write_metrics(out, metrics, config=config, checkpoint=checkpoint, timing=timing)
    return metrics
