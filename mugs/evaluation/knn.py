"""Weighted k-nearest-neighbour classification on frozen features (METHOD §8, the DINO protocol).

For a query ``q`` and bank rows ``x_i`` with labels ``y_i``, similarities are cosine,
``s_i = q·x_i / (‖q‖‖x_i‖)``; the score of class ``c`` sums ``exp(s_i / T)`` over the ``k`` most similar
bank rows with ``y_i = c``, and classes are ranked by score.

Ties: classes with equal scores are ranked lower class index first (a stable descending sort), so a
query whose votes split evenly predicts the lower index. Bank rows with exactly equal similarity at
the k-th place are taken in ``torch.topk``'s order, which is unspecified; with float features such
ties are rare and change a score by at most one vote's weight. ``k`` larger than the bank uses the
whole bank; ``k`` larger than a class simply lets other classes' neighbours vote.

The bank is processed ``bank_chunk_size`` rows at a time (each block moved to ``device`` once) and
the queries ``chunk_size`` at a time, with a running top-k per query merged across bank blocks: memory
on the device is ``O(bank_chunk_size · D + chunk_size · bank_chunk_size + Q · k)``, while the bank
itself may stay memory-mapped on the host (a cached feature file).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mugs.config import Config
from mugs.evaluation.features import FeatureSet, evaluation_features
from mugs.evaluation.metrics_io import run_evaluation

__all__ = [
    "KnnPrediction",
    "knn_classify",
    "knn_evaluate",
    "nearest_neighbours",
    "rank_classes",
    "run_knn",
    "vote",
]


@dataclass
class KnnPrediction:
    """``classes``: ``[Q, top]`` best class first; ``scores``: their vote totals ``[Q, top]``."""

    classes: Tensor
    scores: Tensor


def vote(similarities: Tensor, neighbour_labels: Tensor, *, temperature: float, num_classes: int) -> Tensor:
    """Class scores ``[Q, C]``: ``score_c = Σ_{i: y_i = c} exp(s_i / T)`` over the given neighbours.

    In float64: ``exp(1/T)`` overflows float32 below T ≈ 0.012, float64 only below T ≈ 0.0014.
    """
    weights = (similarities.double() / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float64, device=similarities.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def rank_classes(scores: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` best classes per row and their scores; equal scores rank the lower class index first."""
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    top = min(top, scores.shape[1])
    return order[:, :top], values[:, :top]


def _normalised(rows: Tensor, device: torch.device) -> Tensor:
    rows = rows.to(device, torch.float32)
    return rows * rows.norm(dim=1, keepdim=True).clamp_min(1e-12).reciprocal()


def nearest_neighbours(
    bank: Tensor,
    queries: Tensor,
    *,
    k: int,
    chunk_size: int = 1024,
    bank_chunk_size: int = 262144,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(first query index, similarities [q, k'], bank indices [q, k'])`` per query chunk, most
    similar first, with ``k' = min(k, len(bank))``; similarities are cosine.

    The bank is the outer loop, so each block of it crosses to ``device`` once however many queries
    there are; every query chunk keeps a running top-k (``len(queries) · k'`` values in all).
    """
    device = torch.device(device) if device is not None else bank.device
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank has dimension {bank.shape[1]}, queries {queries.shape[1]}")
    k = min(k, bank.shape[0])
    starts = range(0, queries.shape[0], chunk_size)
    best: list[tuple[Tensor, Tensor] | None] = [None] * len(starts)
    for bank_start in range(0, bank.shape[0], bank_chunk_size):
        block = _normalised(bank[bank_start : bank_start + bank_chunk_size], device)
        for chunk, start in enumerate(starts):
            sims = _normalised(queries[start : start + chunk_size], device) @ block.T
            sims, index = sims.topk(min(k, block.shape[0]), dim=1)
            index += bank_start
            previous = best[chunk]
            if previous is not None:
                sims, order = torch.cat([previous[0], sims], dim=1).topk(k, dim=1)
                index = torch.cat([previous[1], index], dim=1).gather(1, order)
            best[chunk] = (sims, index)
        del block
    for start, (sims, index) in zip(starts, best, strict=True):
        yield start, sims, index


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
    bank_chunk_size: int = 262144,
    top: int = 5,
    device: torch.device | str | None = None,
) -> KnnPrediction:
    """Rank the ``top`` classes of every test row by the weighted vote of its ``k`` nearest train rows."""
    device = torch.device(device) if device is not None else train_features.device
    labels = train_labels.to(device)
    classes, scores = [], []
    for _, sims, index in nearest_neighbours(
        train_features,
        test_features,
        k=k,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
        device=device,
    ):
        ranked, values = rank_classes(
            vote(sims, labels[index], temperature=temperature, num_classes=num_classes), top
        )
        classes.append(ranked.cpu())
        scores.append(values.cpu())
    return KnnPrediction(torch.cat(classes), torch.cat(scores))


def knn_evaluate(
    train: FeatureSet,
    test: FeatureSet,
    *,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int = 1024,
    bank_chunk_size: int = 262144,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (fractions) of ``test`` against the ``train`` bank for every ``k``, on the
    fine labels and, when both sets have them, the coarse labels (a separate vote with the bank's
    coarse labels). One neighbour search at ``max(ks)`` serves every ``k``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    label_sets = {"fine": (train.labels, test.labels, train.num_classes)}
    if train.coarse_labels is not None and test.coarse_labels is not None:
        label_sets["coarse"] = (train.coarse_labels, test.coarse_labels, len(train.coarse_classes or []))
    ks = sorted(set(ks))
    correct = {name: {k: [0, 0] for k in ks} for name in label_sets}
    bank_labels = {name: labels.to(device) for name, (labels, _, _) in label_sets.items()}
    for start, sims, index in nearest_neighbours(
        train.features,
        test.features,
        k=max(ks),
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
        device=device,
    ):
        for name, (_, test_labels, num_classes) in label_sets.items():
            truth = test_labels[start : start + sims.shape[0]].to(device)[:, None]
            neighbour_labels = bank_labels[name][index]
            for k in ks:
                scores = vote(
                    sims[:, :k], neighbour_labels[:, :k], temperature=temperature, num_classes=num_classes
                )
                ranked, _ = rank_classes(scores, 5)
                hits = ranked == truth
                correct[name][k][0] += int(hits[:, 0].sum())
                correct[name][k][1] += int(hits.any(dim=1).sum())
    total = len(test)
    result: dict[str, Any] = {
        "temperature": temperature,
        "bank_size": len(train),
        "queries": total,
    }
    for name, per_k in correct.items():
        result[name] = {
            str(k): {"top1": top1 / total, "top5": top5 / total} for k, (top1, top5) in per_k.items()
        }
    return result


def run_knn(
    checkpoint: str | Path,
    config: Config,
    out: str | Path,
    *,
    split: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """kNN of ``split`` (default ``evaluate.knn_split``) against the train bank for every
    ``evaluate.knn_k``; writes the metrics JSON ``out`` and returns its contents without provenance.
    """
    from mugs.distributed import resolve_device

    settings = config.evaluate
    split = split or settings.knn_split
    resolved = torch.device(device) if device else resolve_device(settings.device)
    return run_evaluation(
        config,
        out,
        checkpoint=checkpoint,
        features=lambda: evaluation_features(
            checkpoint, config, ("train", split), device=resolved, progress=progress
        ),
        header={"evaluation": "knn", "split": split, "network": settings.network},
        evaluate=lambda features: knn_evaluate(
            *features,
            ks=settings.knn_k,
            temperature=settings.knn_temperature,
            chunk_size=settings.knn_chunk_size,
            bank_chunk_size=settings.knn_bank_chunk_size,
            device=resolved,
        ),
        timing_key="knn_seconds",
    )
