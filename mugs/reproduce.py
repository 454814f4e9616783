"""Table 1 of the paper from the authors' released checkpoints: ``mugs reproduce-paper SPEC``.

The spec (``configs/reproduce-paper.yaml``) names, per published preset, the downloaded release file
(nothing is downloaded here), and the values shared by every model (the dataset, devices). The
dataset is prepared (``mugs prepare``) when it is not yet. Each
checkpoint is imported (:func:`mugs.interop.import_official_checkpoint`) and evaluated with its
preset's evaluation recipe, the authors' (kNN temperature, the augmented linear probe with its
blocks, pooling and sweep); ``summary.md`` puts each model's figures above the paper's. A model whose
metrics files exist is not evaluated again, so a rerun after a time limit continues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mugs.config import PRESETS, Config, ConfigError, config_from_dict, merge_values, read_yaml
from mugs.files import atomic_write_text

__all__ = ["reproduce_paper"]

_KEYS = {"output_dir", "shared", "models", "trust_pickle"}


def _model_config(spec: dict[str, Any], model: str, output_dir: Path) -> Config:
    shared = merge_values({"evaluate": {"cache_dir": str(output_dir / "features")}}, spec.get("shared") or {})
    return config_from_dict(shared, preset=model)


def reproduce_paper(spec_path: str | Path, *, device: str | None = None, progress: bool = True) -> str:
    """Import and evaluate every model of the spec at ``spec_path``; write and return ``summary.md``."""
    from mugs.data.prepare import run_prepare
    from mugs.evaluation.knn import run_knn
    from mugs.evaluation.linear import run_linear
    from mugs.interop import import_official_checkpoint
    from mugs.report.paper import reproduction_table

    spec = read_yaml(spec_path)
    if unknown := sorted(set(spec) - _KEYS):
        raise ConfigError(f"{spec_path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_KEYS))}")
    models = spec.get("models") or {}
    if not models:
        raise ConfigError(f"{spec_path}: 'models' names no checkpoint")
    output_dir = Path(spec.get("output_dir", "results/reproduce-paper"))
    configs = {}
    for model, source in models.items():
        if model not in PRESETS or model == "demo":
            raise ConfigError(f"{spec_path}: models.{model} is not a published preset")
        if not Path(source).is_file():
            raise ConfigError(
                f"{spec_path}: models.{model}={source} does not exist (download the release first)"
            )
        try:
            configs[model] = _model_config(spec, model, output_dir)
        except ConfigError as error:
            raise ConfigError(f"{spec_path}: models.{model}: {error}") from None
    first = next(iter(configs.values()))
    if not (Path(first.data.prepared_dir) / "summary.json").is_file():
        run_prepare(first.data, progress=progress)
    results = {}
    for model, config in configs.items():
        directory = output_dir / model
        checkpoint = directory / "checkpoint.pt"
        if not checkpoint.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            import_official_checkpoint(models[model], checkpoint, trust_pickle=bool(spec.get("trust_pickle")))
        metrics = {}
        for name, run in (("knn", run_knn), ("linear", run_linear)):
            path = directory / f"{name}.json"
            if path.is_file():
                metrics[name] = json.loads(path.read_text())
            else:
                metrics[name] = run(checkpoint, config, path, device=device, progress=progress)
        results[model] = metrics
    table = reproduction_table(results)
    atomic_write_text(output_dir / "summary.md", "# The paper's Table 1, reproduced\n\n" + table)
    return table
