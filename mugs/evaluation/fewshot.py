"""Few-label evaluation: logistic regression on frozen features of a small labelled subset of train.

Subsets are stratified and seeded: class ``c`` with ``n_c`` train images contributes
``max(1, ⌊fraction · n_c + ½⌋)`` of them (halves round up), drawn from one seeded permutation per
class, so for one seed the 1 % subset is contained in the 10 % one. Features are L2-normalised (as
for kNN). The inverse regularisation strength ``C`` is chosen on the validation split; test is
scored once, with that ``C``. Coarse accuracy is the fine prediction mapped to its coarse class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mugs.config import Config
from mugs.evaluation.features import FeatureSet, evaluation_features
from mugs.evaluation.metrics_io import run_evaluation

__all__ = ["fewshot_evaluate", "logistic_regression", "run_fewshot", "stratified_subset"]


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified subset: ``max(1, ⌊fraction · n_c + ½⌋)`` per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        # the permutation is drawn before the size is used, so every fraction sees the same order
        members = members[rng.permutation(len(members))]
        chosen.append(members[: max(1, math.floor(fraction * len(members) + 0.5))])
    return np.sort(np.concatenate(chosen))


def _normalised(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=1).numpy().astype(np.float64)


def logistic_regression(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    cs: Sequence[float],
    max_iter: int,
):
    """Fit one multinomial logistic regression per ``C`` and return ``(best model, its C, val top-1s)``."""
    from sklearn.linear_model import LogisticRegression

    best, best_c, scores = None, None, {}
    for c in cs:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=0)
        model.fit(train_x, train_y)
        scores[c] = float(model.score(val_x, val_y))
        if best is None or scores[c] > scores[best_c]:
            best, best_c = model, c
    return best, best_c, scores


def fewshot_evaluate(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    *,
    fractions: Sequence[float],
    seed: int,
    cs: Sequence[float],
    max_iter: int,
) -> dict[str, Any]:
    """Per fraction: subset size, the ``C`` chosen on val, and test top-1 (fine, and coarse if defined)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    train_x, val_x, test_x = (_normalised(s.features) for s in (train, val, test))
    train_y, val_y, test_y = (s.labels.numpy() for s in (train, val, test))
    coarse_of_class = train.coarse_of_class()
    results: dict[str, Any] = {"seed": seed, "fractions": {}}
    for fraction in fractions:
        subset = stratified_subset(train_y, fraction, seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model, c, val_scores = logistic_regression(
                train_x[subset], train_y[subset], val_x, val_y, cs=cs, max_iter=max_iter
            )
        for warning in caught:
            if not issubclass(warning.category, ConvergenceWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        predicted = model.predict(test_x)
        entry: dict[str, Any] = {
            "labelled_images": len(subset),
            "C": c,
            "val_top1": {str(key): value for key, value in val_scores.items()},
            "test_top1": float((predicted == test_y).mean()),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        }
        if coarse_of_class is not None and test.coarse_labels is not None:
            coarse = coarse_of_class.numpy()[predicted]
            entry["test_coarse_top1"] = float((coarse == test.coarse_labels.numpy()).mean())
        results["fractions"][str(fraction)] = entry
    return results


def run_fewshot(
    checkpoint: str | Path,
    config: Config,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Few-label logistic regression for every ``evaluate.fewshot_fractions`` on ``checkpoint``'s kNN
    features; writes the metrics JSON ``out`` and returns its contents without provenance.
    """
    settings = config.evaluate
    return run_evaluation(
        config,
        out,
        checkpoint=checkpoint,
        features=lambda: evaluation_features(
            checkpoint, config, ("train", "val", "test"), device=device, progress=progress
        ),
        header={
            "evaluation": "fewshot",
            "network": settings.network,
            "classifier": "multinomial logistic regression (scikit-learn) on L2-normalised features",
        },
        evaluate=lambda features: fewshot_evaluate(
            *features,
            fractions=settings.fewshot_fractions,
            seed=settings.fewshot_seed,
            cs=settings.fewshot_c,
            max_iter=settings.fewshot_max_iter,
        ),
        timing_key="fit_seconds",
    )
