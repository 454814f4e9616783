"""``mugs report``: every figure, the summary table and the curve files for a set of runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mugs.config import Config, config_from_dict, load_config
from mugs.report import figures
from mugs.report.attention import last_block_cls_attention
from mugs.report.runs import (
    RunRecord,
    read_baseline,
    read_run,
    slug,
    summary_markdown,
    summary_payload,
    write_curves,
)
from mugs.rundir import RunDir

__all__ = ["find_checkpoint", "run_report"]

# t-SNE's perplexity must stay below the sample count; fewer points say nothing anyway
_MIN_TSNE = 5


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to show for a run: ``selected.pt``, else the last kept copy, else ``latest.pt``."""
    run = RunDir(run_dir)
    if run.selected.is_file():
        return run.selected
    kept = run.kept_checkpoints()
    if kept:
        return kept[-1][1]
    return run.latest if run.latest.is_file() else None


def _run_config(run_dir: Path, checkpoint: dict[str, Any], overrides: Sequence[str]) -> Config:
    """The run's ``config.yaml`` with ``overrides``; the config saved in the checkpoint when it is gone."""
    recorded = RunDir(run_dir).config
    if recorded.is_file():
        return load_config(recorded, list(overrides))
    return config_from_dict(checkpoint["config"], list(overrides))


def _tsne(features: torch.Tensor, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    # cosine geometry, as kNN sees it; perplexity must stay below the sample count
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(
        x
    )


def _attention_inputs(dataset: Any, count: int) -> list[int]:
    """The first test image of each of the first ``count`` classes present (then more of class 0)."""
    first: dict[int, int] = {}
    for index, label in enumerate(dataset.labels.tolist()):
        first.setdefault(label, index)
    chosen = [first[c] for c in sorted(first)][:count]
    extra = [i for i in range(len(dataset)) if i not in chosen]
    return chosen + extra[: count - len(chosen)]


def _features_and_attention(
    record: RunRecord,
    config: Config | None,
    overrides: Sequence[str],
    out: Path,
    *,
    tsne_indices: dict[int, np.ndarray],
    tsne_samples: int,
    attention_images: int,
    seed: int,
    device: str | None,
    progress: bool,
) -> tuple[dict[str, Any] | None, Path]:
    """The run's t-SNE panel (``None`` without a checkpoint) and its attention figure."""
    from mugs.data.datasets import open_split, read_stats
    from mugs.data.sources import DataError
    from mugs.evaluation.features import eval_transform, extract_features, load_backbone
    from mugs.training.checkpoint import load_checkpoint

    attention_path = out / f"attention-{slug(record.name)}.png"
    title = f"{record.name}: last-block class-token attention"
    checkpoint = find_checkpoint(record.run_dir)
    if checkpoint is None:
        record.notes.append(f"no checkpoint under {record.run_dir}: no t-SNE or attention maps")
        figures.plot_message(attention_path, title, "This run has no checkpoint.")
        return None, attention_path
    payload = load_checkpoint(checkpoint)
    config = config or _run_config(record.run_dir, payload, overrides)
    network = config.evaluate.network
    try:
        test = extract_features(
            checkpoint,
            "test",
            config,
            network=network,
            cache_dir=Path(config.evaluate.cache_dir),
            device=device,
            progress=progress,
        )
        mean, std = read_stats(config.data.prepared_dir)
        backbone, trained = load_backbone(payload, network)
        dataset = open_split(
            config.data.prepared_dir, "test", eval_transform(trained.augment.global_size, mean, std)
        )
    except DataError as error:
        record.notes.append(f"test data unavailable ({error}): no t-SNE or attention maps")
        figures.plot_message(attention_path, title, "The prepared test split is unavailable.")
        return None, attention_path

    n = len(test)
    if n not in tsne_indices:
        rng = np.random.default_rng(seed)
        tsne_indices[n] = np.sort(rng.choice(n, size=min(n, tsne_samples), replace=False))
    chosen = torch.from_numpy(tsne_indices[n])
    panel: dict[str, Any] | None = None
    if len(chosen) < _MIN_TSNE:
        record.notes.append(f"only {len(chosen)} test images: no t-SNE (needs {_MIN_TSNE})")
    else:
        panel = {
            "name": record.name,
            "points": _tsne(test.features[chosen], seed),
            "labels": test.labels[chosen].numpy(),
            "classes": test.classes,
        }
        if test.coarse_labels is not None and test.coarse_classes is not None:
            panel["coarse_labels"] = test.coarse_labels[chosen].numpy()
            panel["coarse_classes"] = test.coarse_classes

    picks = _attention_inputs(dataset, attention_images)
    images = torch.stack([dataset[i][0] for i in picks])
    maps = last_block_cls_attention(backbone, images).numpy()
    shown = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    shown = shown.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    labels = [dataset.classes[int(dataset.labels[i])] for i in picks]
    figures.plot_attention(shown, maps, labels, attention_path, title=f"{title} ({checkpoint.name})")
    return panel, attention_path


def run_report(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    names: Sequence[str] | None = None,
    eval_dirs: Sequence[str | Path] | None = None,
    baselines: Mapping[str, str | Path] | None = None,
    config: Config | None = None,
    overrides: Sequence[str] = (),
    knn_k: int = 20,
    tsne_samples: int = 2000,
    attention_images: int = 4,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the report of ``runs`` into ``out`` and return the paths written.

    Files: ``curves.png``, ``knn_checkpoints.png``, ``accuracy.png``, ``tsne.png``,
    ``attention-<slug>.png`` per run, ``summary.md``, ``summary.json`` and ``curves/<slug>.{csv,json}``,
    where ``<slug>`` is the run's name with characters other than letters, digits, ``.``, ``_``, ``-``
    replaced by ``_``.
    ``baselines`` maps a label to a directory of metrics files (a network at its random
    initialisation, raw pixels): each is a row of the summary and a bar of ``accuracy.png``.
    ``config`` (data location, feature settings) applies to every run; without it each run's own
    ``config.yaml`` is read, with ``overrides`` applied. Missing inputs are noted in the summary,
    never fatal.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("no run directories given")
    names = list(names) if names else [r.name for r in runs]
    if len(names) != len(runs) or len({slug(n) for n in names}) != len(names):
        raise ValueError(f"need one distinct name per run, got {names} for {len(runs)} runs")
    if eval_dirs is not None and len(eval_dirs) != len(runs):
        raise ValueError(f"need one eval directory per run, got {len(eval_dirs)} for {len(runs)} runs")
    for run in runs:
        if not run.is_dir():
            raise FileNotFoundError(f"run directory {run} does not exist")

    records = [
        read_run(run, name=name, eval_dir=None if eval_dirs is None else eval_dirs[i])
        for i, (run, name) in enumerate(zip(runs, names, strict=True))
    ]
    written: dict[str, Any] = {"curves": {}, "attention": {}}
    for record in records:
        written["curves"][record.name] = [str(p) for p in write_curves(record, out / "curves")]
    written["curves.png"] = figures.plot_curves(records, out / "curves.png")
    written["knn_checkpoints.png"] = figures.plot_checkpoint_knn(records, out / "knn_checkpoints.png")

    panels = []
    tsne_indices: dict[int, np.ndarray] = {}
    for record in records:
        panel, attention = _features_and_attention(
            record,
            config,
            overrides,
            out,
            tsne_indices=tsne_indices,
            tsne_samples=tsne_samples,
            attention_images=attention_images,
            seed=seed,
            device=device,
            progress=progress,
        )
        written["attention"][record.name] = attention
        if panel is not None:
            panels.append(panel)
    written["tsne.png"] = figures.plot_tsne(panels, out / "tsne.png")

    payload = summary_payload(
        records, knn_k, [read_baseline(name, directory) for name, directory in (baselines or {}).items()]
    )
    written["accuracy.png"] = figures.plot_accuracy_bars(payload, out / "accuracy.png")
    (out / "summary.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(payload))
    written["summary.json"], written["summary.md"] = out / "summary.json", out / "summary.md"
    return written
