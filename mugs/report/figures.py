"""The report's figures, drawn with matplotlib's object API (no pyplot state, Agg canvas).

Each function writes one PNG. A figure whose data is missing is still written, holding a sentence
that says what is missing, so that the set of files a workflow expects is always complete.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mugs.report.runs import RunRecord, read_curves

__all__ = [
    "CURVE_PANELS",
    "plot_accuracy_bars",
    "plot_attention",
    "plot_checkpoint_knn",
    "plot_curves",
    "plot_message",
    "plot_tsne",
]

DPI = 120

# (log column, panel title, y-axis label)
CURVE_PANELS: tuple[tuple[str, str, str], ...] = (
    ("loss", "total loss (weighted sum)", "loss (nats)"),
    ("instance", "instance loss (InfoNCE)", "loss (nats)"),
    ("local_group", "local-group loss (InfoNCE)", "loss (nats)"),
    ("group", "group loss (cross-entropy)", "loss (nats)"),
    ("lr", "learning rate", "lr (per step)"),
    ("weight_decay", "weight decay", "coefficient"),
    ("teacher_momentum", "teacher EMA momentum", "momentum"),
    ("teacher_temperature", "group teacher temperature", "temperature"),
    ("teacher_feature_std", "collapse watch: teacher feature std", "std of L2-normed CLS"),
    ("group_entropy_ratio", "collapse watch: group entropy", "entropy / log(K)"),
    ("effective_rank", "collapse watch: effective rank", "rank (dimensions)"),
)


def _colours(n: int) -> list:
    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(n)]


def _width(index: int, count: int) -> float:
    """Line width of run ``index``: earlier runs drawn wider so that identical curves stay visible."""
    return 1.5 + 1.5 * (count - 1 - index)


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def plot_message(path: Path, title: str, message: str) -> Path:
    """A small figure holding only ``title`` and ``message`` (for a plot whose inputs are missing)."""
    figure = Figure(figsize=(7, 2.5), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title, fontsize=13)
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=axes.transAxes)
    return _save(figure, path)


def plot_curves(records: list[RunRecord], path: Path) -> Path:
    """Small multiples of every logged training signal against the global iteration, runs overlaid."""
    curves = {record.name: read_curves(record) for record in records}
    panels = [p for p in CURVE_PANELS if any(p[0] in row for rows in curves.values() for row in rows)]
    if not panels:
        return plot_message(path, "Training curves", "No run has iteration records in its log.jsonl.")
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    colours = _colours(len(records))
    for axes, (column, title, ylabel) in zip(grid.flat, panels, strict=False):
        for index, (colour, record) in enumerate(zip(colours, records, strict=True)):
            points = [(row["step"], row[column]) for row in curves[record.name] if column in row]
            if points:
                x, y = zip(*points, strict=True)
                axes.plot(
                    x,
                    y,
                    color=colour,
                    linewidth=_width(index, len(records)),
                    marker="." if len(points) < 30 else None,
                    label=record.name,
                )
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("iteration")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if column == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axes in grid.flat[len(panels) :]:
        axes.set_axis_off()
    handles = [Line2D([], [], color=c, lw=2, label=r.name) for c, r in zip(colours, records, strict=True)]
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(len(records), 6), fontsize=10, title="run"
    )
    figure.suptitle("Pretraining curves", fontsize=13)
    return _save(figure, path)


def plot_checkpoint_knn(records: list[RunRecord], path: Path) -> Path:
    """Validation kNN top-1 of every kept checkpoint (fine solid, coarse dashed); the selected one starred."""
    scored = [(record, record.checkpoint_scores()) for record in records]
    if not any(scores for _, scores in scored):
        return plot_message(
            path,
            "kNN accuracy per kept checkpoint",
            "No run has a selection.json with checkpoint scores (run `mugs select` first).",
        )
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for index, (colour, (record, scores)) in enumerate(zip(_colours(len(records)), scored, strict=True)):
        if not scores:
            continue
        width = _width(index, len(records))
        epochs = [s["epoch"] for s in scores]
        fine = [100 * s["fine"] for s in scores]
        axes.plot(epochs, fine, "o-", color=colour, lw=width, ms=3 + 2 * width, label=f"{record.name}: fine")
        coarse = [(s["epoch"], 100 * s["coarse"]) for s in scores if "coarse" in s]
        if coarse:
            x, y = zip(*coarse, strict=True)
            axes.plot(x, y, "s--", color=colour, lw=width, ms=3 + 2 * width, label=f"{record.name}: coarse")
        selected = record.selected_epoch()
        chosen = [s for s in scores if s["epoch"] == selected]
        if chosen:
            axes.plot(
                selected, 100 * chosen[0]["fine"], "*", color=colour, markersize=18, markeredgecolor="k"
            )
    axes.plot([], [], "*", color="grey", markersize=14, markeredgecolor="k", label="selected checkpoint")
    axes.set_xlabel("epoch of the kept checkpoint")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation kNN top-1 (%)")
    axes.set_title("kNN accuracy per kept checkpoint (validation split)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=9)
    return _save(figure, path)


def plot_accuracy_bars(payload: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per evaluation, one bar per run and then per baseline (hatched), test
    top-1 %, values printed on top."""
    baselines = payload.get("baselines", [])
    runs = [*payload["runs"], *baselines]
    metrics = [m for m in payload["metrics"] if any(r["metrics"][m["key"]] is not None for r in runs)]
    if not metrics:
        return plot_message(
            path,
            "Accuracy per evaluation",
            "No run has any evaluation metrics (knn/linear/fewshot/finetune).",
        )
    missing = [m["label"] for m in payload["metrics"] if m not in metrics]
    size = (max(7.0, 1.3 * len(metrics) * max(1, len(runs)) ** 0.5 + 2), 5.0)
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(len(runs), 1)
    positions = np.arange(len(metrics))
    for i, (colour, run) in enumerate(zip(_colours(len(runs)), runs, strict=True)):
        values = [run["metrics"][m["key"]] for m in metrics]
        x = positions - 0.4 + width * (i + 0.5)
        heights = [100 * v if v is not None else 0.0 for v in values]
        baseline = run in baselines
        bars = axes.bar(
            x,
            heights,
            width,
            color=colour,
            hatch="//" if baseline else None,
            edgecolor="white" if baseline else None,
            label=f"{run['name']} (baseline)" if baseline else run["name"],
        )
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value is None else f"{100 * value:.1f}"
            axes.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if len(runs) > 2 else 0,
            )
    labels = [
        m["label"] + (f"\n(k={payload['knn_k']})" if m["key"].startswith("knn") else "") for m in metrics
    ]
    axes.set_xticks(positions, labels, fontsize=9)
    axes.set_ylabel("test top-1 accuracy (%)")
    axes.set_ylim(0, 112)
    axes.set_title("Accuracy per evaluation")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(
        title="run / baseline" if baselines else "run", fontsize=9, loc="upper right", ncols=min(len(runs), 4)
    )
    if missing:
        figure.text(
            0.01, 0.005, "not available for any run: " + ", ".join(missing), fontsize=8, color="dimgray"
        )
    return _save(figure, path)


def plot_tsne(panels: list[dict[str, Any]], path: Path) -> Path:
    """One column per run, a row coloured by fine class and (when defined) one by coarse class.

    Each panel dict holds ``name``, ``points`` ``[n, 2]``, ``labels``, ``classes`` and optionally
    ``coarse_labels`` / ``coarse_classes``.
    """
    if not panels:
        return plot_message(path, "t-SNE of test features", "No run has a checkpoint and enough test images.")
    coarse = any(p.get("coarse_labels") is not None for p in panels)
    rows = 2 if coarse else 1
    figure = Figure(figsize=(4.6 * len(panels) + 2.2, 4.4 * rows), layout="constrained")
    grid = figure.subplots(rows, len(panels), squeeze=False)
    for column, panel in enumerate(panels):
        kinds = [("labels", "classes", "fine classes")]
        if coarse:
            kinds.append(("coarse_labels", "coarse_classes", "coarse classes"))
        for row, (labels_key, classes_key, what) in enumerate(kinds):
            axes = grid[row, column]
            labels, classes = panel.get(labels_key), panel.get(classes_key)
            if labels is None or classes is None:
                axes.set_axis_off()
                axes.text(0.5, 0.5, "no coarse labels", ha="center", transform=axes.transAxes)
                continue
            colours = (
                _colours(len(classes))
                if len(classes) <= 10
                else colormaps["turbo"](np.linspace(0, 1, len(classes)))
            )
            for index, name in enumerate(classes):
                chosen = np.asarray(labels) == index
                if chosen.any():
                    axes.scatter(*panel["points"][chosen].T, s=6, color=colours[index], label=name, alpha=0.8)
            axes.set_title(f"{panel['name']}: {what}", fontsize=10)
            axes.set_xlabel("t-SNE 1")
            axes.set_ylabel("t-SNE 2")
            axes.set_xticks([])
            axes.set_yticks([])
            if column == len(panels) - 1 and len(classes) <= 20:
                axes.legend(fontsize=8, markerscale=2.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    n = len(panels[0]["points"])
    figure.suptitle(f"t-SNE of test features (teacher CLS, {n} images per run)", fontsize=12)
    return _save(figure, path)


def plot_attention(
    images: np.ndarray, maps: np.ndarray, row_labels: list[str], path: Path, *, title: str, heads: int = 3
) -> Path:
    """Each row an image: the input, the head-mean CLS attention overlaid, then the first ``heads`` heads.

    ``images`` ``[N, H, W, 3]`` in [0, 1]; ``maps`` ``[N, num_heads, gh, gw]`` (rows of a softmax).
    Each map is stretched to its own min–max range so its pattern shows even when it is nearly flat;
    the corner number is its peak over the uniform value ``1 / (gh·gw)``, which says how flat it is.
    """
    shown = min(heads, maps.shape[1])
    columns = 2 + shown
    figure = Figure(figsize=(2.1 * columns, 2.2 * len(images) + 0.7), layout="constrained")
    grid = figure.subplots(len(images), columns, squeeze=False)
    height, width = images.shape[1:3]
    uniform = 1.0 / (maps.shape[2] * maps.shape[3])
    extent = (0, width, height, 0)
    for row, (image, attention) in enumerate(zip(images, maps, strict=True)):
        panels = [("input", None), (f"mean of {maps.shape[1]} heads", attention.mean(axis=0))]
        panels += [(f"head {h + 1}", attention[h]) for h in range(shown)]
        for column, (name, heat) in enumerate(panels):
            axes = grid[row, column]
            if heat is None:
                axes.imshow(image, extent=extent)
            else:
                axes.imshow(image.mean(axis=2), cmap="gray", extent=extent, vmin=0, vmax=1)
                low, high = float(heat.min()), float(heat.max())
                axes.imshow(
                    (heat - low) / max(high - low, 1e-12),
                    cmap="inferno",
                    alpha=0.65,
                    extent=extent,
                    interpolation="bilinear",
                    vmin=0,
                    vmax=1,
                )
                axes.text(
                    0.03,
                    0.04,
                    f"peak {high / uniform:.1f}× uniform",
                    transform=axes.transAxes,
                    fontsize=7,
                    color="white",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0},
                )
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(name, fontsize=9)
            if column == 0:
                axes.set_ylabel(row_labels[row], fontsize=9)
    figure.suptitle(
        title + "\n(colour: attention, min–max per map; dark = least, bright = most)", fontsize=10
    )
    return _save(figure, path)
