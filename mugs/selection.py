"""Checkpoint selection: score every checkpoint a pretraining run kept, pick one for evaluation.

Each candidate is scored by weighted kNN (``evaluate.selection_k``, ``evaluate.knn_temperature``) with
the train split as the bank and the **validation** split as queries; the test split is never opened,
so selecting on it cannot leak into the reported test numbers. Policy ``best_knn`` takes the highest
validation top-1 (ties: the later epoch, the more trained of equals); ``last`` takes the last kept
checkpoint and still records every score. The choice is published as ``<run>/selected.pt`` (a hard
link, or a copy where links are impossible, replaced atomically) next to ``<run>/selection.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch

from mugs.config import Config
from mugs.evaluation.metrics_io import write_metrics
from mugs.files import file_sha256, publish_link
from mugs.rundir import SELECTED, SELECTION, RunDir
from mugs.training import checkpoint as ckpt

__all__ = ["candidate_checkpoints", "select_checkpoint"]


def candidate_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The kept ``(epoch, path)`` pairs of a run, oldest first; ``latest.pt`` alone when none was kept."""
    run = RunDir(run_dir)
    kept = run.kept_checkpoints()
    if kept:
        return kept
    if run.latest.is_file():
        return [(int(ckpt.load_checkpoint(run.latest)["epoch"]), run.latest)]
    raise FileNotFoundError(
        f"{run.checkpoints} holds no checkpoint (neither epochNNNN.pt nor {run.latest.name})"
    )


def select_checkpoint(
    run_dir: Path,
    config: Config,
    *,
    policy: Literal["best_knn", "last"] | None = None,
    device: str | None = None,
    progress: bool = False,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Score the run's checkpoints on val, choose one by ``policy`` (default ``evaluate.selection_policy``),
    write ``selection.json`` and ``selected.pt`` into ``out_dir`` (default ``run_dir``), and return what
    was written.
    """
    from mugs.distributed import resolve_device
    from mugs.evaluation.features import evaluation_features
    from mugs.evaluation.knn import knn_evaluate

    policy = policy or config.evaluate.selection_policy
    if policy not in ("best_knn", "last"):
        raise ValueError(f"unknown selection policy {policy!r}; valid: best_knn, last")
    run_dir = Path(run_dir)
    settings = config.evaluate
    resolved = torch.device(device) if device else resolve_device(settings.device)
    started = time.perf_counter()
    scores = []
    for epoch, path in candidate_checkpoints(run_dir):
        train, val = evaluation_features(path, config, ("train", "val"), device=resolved, progress=progress)
        knn = knn_evaluate(
            train,
            val,
            ks=[settings.selection_k],
            temperature=settings.knn_temperature,
            chunk_size=settings.knn_chunk_size,
            bank_chunk_size=settings.knn_bank_chunk_size,
            device=resolved,
        )
        entry = {
            "epoch": epoch,
            "path": str(path),
            "sha256": file_sha256(path),
            "val_top1": knn["fine"][str(settings.selection_k)]["top1"],
            "val_top5": knn["fine"][str(settings.selection_k)]["top5"],
        }
        if "coarse" in knn:
            entry["val_coarse_top1"] = knn["coarse"][str(settings.selection_k)]["top1"]
        scores.append(entry)

    if policy == "last":
        chosen = scores[-1]
        reason = f"policy 'last': the last kept checkpoint (epoch {chosen['epoch']})"
    else:
        chosen = max(reversed(scores), key=lambda s: s["val_top1"])
        reason = (
            f"policy 'best_knn': highest val kNN top-1 ({chosen['val_top1']:.4f}, k={settings.selection_k}, "
            f"T={settings.knn_temperature}) among {len(scores)} checkpoints; ties go to the later epoch"
        )
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = out_dir / SELECTED
    publish_link(chosen["path"], selected)
    result = {
        "policy": policy,
        "selected": {**chosen, "published_as": str(selected)},
        "reason": reason,
        "split": "val",
        "k": settings.selection_k,
        "temperature": settings.knn_temperature,
        "network": settings.network,
        "scores": scores,
    }
    write_metrics(
        out_dir / SELECTION,
        result,
        config=config,
        checkpoint=selected,
        timing={"seconds": time.perf_counter() - started},
    )
    return result
