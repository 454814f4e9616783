"""The paper's ImageNet-1K figures (sail-sg/mugs README, Table 1: k-NN and linear top-1, %), the
reference row of each model in the reproduction's table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PAPER_TOP1", "reproduction_table"]

PAPER_TOP1: dict[str, dict[str, float]] = {
    "vit_small_100ep": {"knn": 72.3, "linear": 76.4},
    "vit_small_300ep": {"knn": 74.8, "linear": 78.2},
    "vit_small_800ep": {"knn": 75.6, "linear": 78.9},
    "vit_base_400ep": {"knn": 78.0, "linear": 80.6},
    "vit_large_250ep": {"knn": 80.3, "linear": 82.1},
}


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def reproduction_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: per model, the pipeline's kNN (at k = 20) and linear test top-1 from its metrics
    (``results[model]["knn"|"linear"]``), then the paper's row."""
    lines = [
        "| model | source | kNN top-1 (k=20) | linear top-1 | linear protocol |",
        "|---|---|---:|---:|---|",
    ]
    for model, metrics in results.items():
        knn, linear = metrics["knn"], metrics["linear"]
        knn_top1 = knn["fine"].get("20", {}).get("top1")
        lines.append(
            f"| {model} | this pipeline | {_percent(knn_top1)} | {_percent(linear['test']['top1'])} "
            f"| {linear['protocol']} |"
        )
        paper = PAPER_TOP1.get(model)
        if paper is not None:
            lines.append(
                f"| {model} | paper (Table 1) | {paper['knn']:.1f} | {paper['linear']:.1f} | augmented |"
            )
    return "\n".join(lines) + "\n"
