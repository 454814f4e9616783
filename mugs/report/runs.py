"""What the report reads from a run: its training log, checkpoint scores and evaluation metrics.

Every reader is defensive: a missing file or key becomes ``None`` plus a note naming it, so a report
of a half-finished pipeline still renders whatever exists.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mugs.rundir import SELECTION, RunDir

__all__ = [
    "CURVE_COLUMNS",
    "METRICS",
    "Metric",
    "RunRecord",
    "knn_key",
    "read_baseline",
    "read_curves",
    "read_run",
    "slug",
    "summary_markdown",
    "summary_payload",
    "write_curves",
]

# Columns of the curves file (DVC ``plots:``), in this order; ``step`` is the global iteration.
CURVE_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "instance",
    "local_group",
    "group",
    "lr",
    "weight_decay",
    "teacher_momentum",
    "teacher_temperature",
    "teacher_feature_std",
    "group_entropy_ratio",
    "effective_rank",
    "images_per_second",
    "data_wait_fraction",
)


def slug(name: str) -> str:
    """``name`` made safe for a file name (letters, digits, ``.``, ``_``, ``-``; others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _dig(data: Any, *keys: Any) -> float | None:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def knn_key(knn: dict[str, Any], k: int) -> str | None:
    """The ``k`` entry of a kNN metrics file, or its smallest ``k`` when ``k`` was not evaluated."""
    fine = knn.get("fine") if isinstance(knn, dict) else None
    if not isinstance(fine, dict) or not fine:
        return None
    if str(k) in fine:
        return str(k)
    numeric = sorted(key for key in fine if key.isdigit())
    return min(numeric, key=int) if numeric else None


def _fraction(fewshot: dict[str, Any], wanted: float) -> float | None:
    fractions = fewshot.get("fractions") if isinstance(fewshot, dict) else None
    if not isinstance(fractions, dict):
        return None
    for key, entry in fractions.items():
        try:
            if math.isclose(float(key), wanted, rel_tol=1e-9):
                return _dig(entry, "test_top1")
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Metric:
    """One test accuracy of the summary: where it lives and how to read it from that file."""

    key: str
    label: str
    file: str
    read: Callable[[dict[str, Any], int], float | None]


METRICS: tuple[Metric, ...] = (
    Metric("knn_fine", "kNN fine", "knn.json", lambda d, k: _dig(d, "fine", knn_key(d, k), "top1")),
    Metric("knn_coarse", "kNN coarse", "knn.json", lambda d, k: _dig(d, "coarse", knn_key(d, k), "top1")),
    Metric("linear_fine", "linear fine", "linear.json", lambda d, k: _dig(d, "test", "top1")),
    Metric("linear_coarse", "linear coarse", "linear.json", lambda d, k: _dig(d, "test", "coarse_top1")),
    Metric("fewshot_1", "few-label 1%", "fewshot.json", lambda d, k: _fraction(d, 0.01)),
    Metric("fewshot_10", "few-label 10%", "fewshot.json", lambda d, k: _fraction(d, 0.1)),
    Metric("finetune_fine", "fine-tune fine", "finetune.json", lambda d, k: _dig(d, "fine", "top1")),
    Metric("finetune_coarse", "fine-tune coarse", "finetune.json", lambda d, k: _dig(d, "coarse", "top1")),
)


@dataclass
class RunRecord:
    """One run as the report sees it; ``notes`` says what was missing or unreadable."""

    name: str
    run_dir: Path
    eval_dir: Path
    log: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] | None = None
    metric_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def iterations(self) -> list[dict[str, Any]]:
        return [r for r in self.log if r.get("type") == "iteration"]

    def metrics(self, knn_k: int) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for metric in METRICS:
            data = self.metric_files.get(metric.file)
            values[metric.key] = None if data is None else metric.read(data, knn_k)
        return values

    def checkpoint_scores(self) -> list[dict[str, float]]:
        """``[{"epoch", "fine", "coarse"?}]`` from ``selection.json``, by epoch.

        The fine score is ``val_top1`` (``knn_top1`` or ``top1`` in other writers' files).
        """
        scores = (self.selection or {}).get("scores")
        rows = []
        for entry in scores if isinstance(scores, list) else []:
            epoch = _dig(entry, "epoch")
            fine = next(
                (v for v in (_dig(entry, k) for k in ("val_top1", "knn_top1", "top1")) if v is not None), None
            )
            if epoch is None or fine is None:
                continue
            row = {"epoch": epoch, "fine": fine}
            coarse = _dig(entry, "val_coarse_top1")
            if coarse is not None:
                row["coarse"] = coarse
            rows.append(row)
        return sorted(rows, key=lambda r: r["epoch"])

    def selected_epoch(self) -> float | None:
        return _dig(self.selection or {}, "selected", "epoch")


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        notes.append(f"{path} is missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        notes.append(f"{path} is unreadable ({error})")
        return None


def _read_log(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        notes.append(f"{path} is missing: no training curves")
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            # a line cut short by a crash or a concurrent writer; the rest is still worth plotting
            notes.append(f"{path}:{number} is not JSON; skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run(
    run_dir: str | Path, *, name: str | None = None, eval_dir: str | Path | None = None
) -> RunRecord:
    """Read a run directory: ``log.jsonl``, ``selection.json`` and the metrics files of its eval dir.

    ``eval_dir`` defaults to ``<run>/eval``; a metrics file not found there is looked for in the run
    directory itself, and ``selection.json`` likewise in both places (run directory first).
    """
    run_dir = Path(run_dir)
    eval_dir = Path(eval_dir) if eval_dir is not None else RunDir(run_dir).eval
    record = RunRecord(name=name or run_dir.name, run_dir=run_dir, eval_dir=eval_dir)
    record.log = _read_log(RunDir(run_dir).log, record.notes)
    places = (eval_dir, run_dir) if eval_dir != run_dir else (run_dir,)

    def first(file: str, order: tuple[Path, ...]) -> Any:
        for directory in order:
            if (directory / file).is_file():
                return _read_json(directory / file, record.notes)
        record.notes.append(f"no {file} in {' or '.join(str(d) for d in order)}")
        return None

    selection = first(SELECTION, tuple(reversed(places)))
    record.selection = selection if isinstance(selection, dict) else None
    for file in dict.fromkeys(metric.file for metric in METRICS):
        data = first(file, places)
        if isinstance(data, dict):
            record.metric_files[file] = data
    return record


def read_baseline(name: str, directory: str | Path) -> RunRecord:
    """A baseline (no training, no checkpoint selection): only the metrics files found in
    ``directory``. A baseline has only some evaluations, so a missing file is not noted; an
    unreadable one is."""
    directory = Path(directory)
    record = RunRecord(name=name, run_dir=directory, eval_dir=directory)
    for file in dict.fromkeys(metric.file for metric in METRICS):
        if (directory / file).is_file() and isinstance(
            data := _read_json(directory / file, record.notes), dict
        ):
            record.metric_files[file] = data
    return record


def read_curves(record: RunRecord) -> list[dict[str, float]]:
    """One row per logged iteration, with the :data:`CURVE_COLUMNS` present in that line."""
    rows = []
    for entry in record.iterations():
        row = {"step": entry.get("global_iteration")}
        for column in CURVE_COLUMNS[1:]:
            value = entry.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[column] = value
        if isinstance(row["step"], int):
            rows.append(row)
    return rows


def write_curves(record: RunRecord, directory: str | Path) -> tuple[Path, Path]:
    """``<directory>/<slug(name)>.csv`` (empty cells where a value was not logged) and ``<name>.json``.

    Both suit DVC ``plots:`` with ``x: step``; the JSON is a list of records holding only logged keys.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = read_curves(record)
    columns = [c for c in CURVE_COLUMNS if any(c in row for row in rows)] or ["step"]
    csv_path = directory / f"{slug(record.name)}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path = directory / f"{slug(record.name)}.json"
    json_path.write_text(json.dumps(rows, indent=0) + "\n")
    return csv_path, json_path


def summary_payload(
    records: list[RunRecord], knn_k: int, baselines: Sequence[RunRecord] = ()
) -> dict[str, Any]:
    """The summary table as plain data: metric definitions, then per run its values and notes, then
    per baseline (see :func:`read_baseline`) its values and notes."""
    return {
        "knn_k": knn_k,
        "metrics": [{"key": m.key, "label": m.label, "file": m.file} for m in METRICS],
        "runs": [
            {
                "name": r.name,
                "run_dir": str(r.run_dir),
                "eval_dir": str(r.eval_dir),
                "metrics": r.metrics(knn_k),
                "selected_epoch": r.selected_epoch(),
                "notes": list(r.notes),
            }
            for r in records
        ],
        "baselines": [
            {"name": b.name, "eval_dir": str(b.eval_dir), "metrics": b.metrics(knn_k), "notes": list(b.notes)}
            for b in baselines
        ],
    }


def summary_markdown(payload: dict[str, Any]) -> str:
    """A markdown table: one row per run, one column per metric (test top-1 in %, "—" when missing)."""
    labels = [
        m["label"] + (f" (k={payload['knn_k']})" if m["key"].startswith("knn") else "")
        for m in payload["metrics"]
    ]
    lines = [
        "| run | " + " | ".join(labels) + " | selected epoch |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    baselines = payload.get("baselines", [])
    for run in [*payload["runs"], *baselines]:
        cells = [
            "—" if run["metrics"][m["key"]] is None else f"{100 * run['metrics'][m['key']]:.1f}"
            for m in payload["metrics"]
        ]
        epoch = run.get("selected_epoch")
        name = f"{run['name']} (baseline)" if run in baselines else run["name"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if epoch is None else int(epoch)} |")
    lines += ["", "Test top-1 accuracy in %; — marks a metric whose file is missing or lacks it."]
    if baselines:
        lines += [
            "Baselines use the same splits and evaluation settings: a run's networks at their random "
            "initialisation (same seed, no training) and raw pixels; what pretraining added is a run's "
            "lead over them."
        ]
    notes = [f"- {run['name']}: {note}" for run in [*payload["runs"], *baselines] for note in run["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"
