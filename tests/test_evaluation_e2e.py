"""Pretrain a few dozen iterations on real Fashion-MNIST, then select, extract and evaluate end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from workflow_helpers import comparable_metrics

from mugs.cli import main
from mugs.config import Config, config_from_dict
from mugs.data import datasets
from mugs.data.prepare import run_prepare
from mugs.data.sources import FASHION_MNIST_SYSTEM_DIR, install_demo_data
from mugs.evaluation.features import extract_features
from mugs.evaluation.fewshot import run_fewshot
from mugs.evaluation.linear import run_linear
from mugs.rundir import SELECTED
from mugs.selection import select_checkpoint
from mugs.training.pretrain import run_pretraining

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
    ),
]


def demo_config(tmp: Path, cache: str = "features") -> Config:
    # The demo preset shrunk: 16-px globals with 8-px patches (5 tokens); 23 images per class, 2 of them
    # held out for val, so 210 train images (230 test), batch 16: 13 iterations per epoch, 2 epochs, each
    # kept.
    return config_from_dict(
        {
            "preset": "demo",
            "model": {"patch_size": 8, "hidden_dim": 64, "out_dim": 32, "predictor_hidden_dim": 64},
            "loss": {"instance_queue_size": 256, "local_group_queue_size": 256, "local_group_knn_top_n": 4},
            "augment": {"global_size": 16, "local_size": 8},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 1e-3},
            "data": {"root": str(tmp / "fm"), "prepared_dir": str(tmp / "prepared"), "max_per_class": 23},
            # one intra-op thread: on a busy 2-core machine, two spinning OpenMP threads ran 2-8x slower
            "train": {
                "output_dir": str(tmp / "run"),
                "num_workers": 0,
                "checkpoint_every": 0,
                "keep_every_epochs": 1,
                "threads": 1,
            },
            "evaluate": {
                "device": "cpu",
                "num_workers": 0,
                "batch_size": 256,
                "cache_dir": str(tmp / cache),
                "linear_epochs": 3,
                # the published presets' probe (the demo's reads the last block alone)
                "linear_n_last_blocks": 4,
                "linear_lrs": [1e-2, 1e-1, 1.0],
                "fewshot_c": [1.0, 10.0],
            },
        }
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    config = demo_config(tmp)
    install_demo_data(Path(config.data.root))
    run_prepare(config.data, progress=False)
    result = run_pretraining(config, progress=False)
    assert result.status == "finished" and result.global_iteration == 26
    return tmp


def record_opened_splits(monkeypatch) -> list[str]:
    opened: list[str] = []
    original = datasets.open_split

    def recording(prepared_dir, split, *args, **kwargs):
        opened.append(split)
        return original(prepared_dir, split, *args, **kwargs)

    monkeypatch.setattr(datasets, "open_split", recording)
    return opened


def test_selection_scores_on_val_and_never_opens_test(run: Path, monkeypatch) -> None:
    opened = record_opened_splits(monkeypatch)
    result = select_checkpoint(run / "run", demo_config(run, cache="selection-features"))
    assert "test" not in opened
    assert opened.count("train") == 2 and opened.count("val") == 2  # two kept checkpoints, cold cache
    assert [s["epoch"] for s in result["scores"]] == [1, 2]
    assert all(0.2 < s["val_top1"] <= 1 for s in result["scores"])
    assert (run / "run" / SELECTED).is_file()
    assert json.loads((run / "run" / "selection.json").read_text())["split"] == "val"


def test_knn_command_beats_chance_on_fine_and_coarse_labels(run: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "params.yaml"
    config_file.write_text(yaml.safe_dump(demo_config(run).to_dict()))
    out = tmp_path / "knn.json"
    checkpoint = run / "run" / "checkpoints" / "epoch0002.pt"
    assert (
        main(["knn", str(checkpoint), "--out", str(out), "--config", str(config_file), "--no-progress"]) == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["split"] == "test" and metrics["queries"] == 230 and metrics["bank_size"] == 210
    assert set(metrics["fine"]) == {"10", "20", "100", "200"}
    assert metrics["fine"]["20"]["top1"] > 0.35  # 10 classes: chance is 0.1
    assert metrics["coarse"]["20"]["top1"] > metrics["fine"]["20"]["top1"]
    assert metrics["fine"]["20"]["top5"] >= metrics["fine"]["20"]["top1"]
    assert len(metrics["provenance"]["checkpoint_sha256"]) == 64


def test_features_are_cached_and_deterministic(run: Path, monkeypatch) -> None:
    checkpoint = run / "run" / "checkpoints" / "epoch0001.pt"
    config = demo_config(run, cache="determinism")
    first = extract_features(checkpoint, "val", config, cache_dir=run / "determinism", progress=False)
    again = extract_features(checkpoint, "val", config, cache_dir=run / "determinism-2", progress=False)
    assert first.features.shape == (20, 192) and first.features.dtype == torch.float32
    assert torch.equal(first.features, again.features)
    assert torch.bincount(first.labels).tolist() == [2] * 10

    def refuse(*args, **kwargs):
        raise AssertionError("a cached split was opened again")

    monkeypatch.setattr(datasets, "open_split", refuse)
    cached = extract_features(checkpoint, "val", config, cache_dir=run / "determinism", progress=False)
    assert torch.equal(cached.features, first.features)


def _truncate(cache: Path) -> None:
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])


def _flip_a_byte(cache: Path) -> None:
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.write_bytes(bytes(data))


def _drop_the_record(cache: Path) -> None:
    cache.with_name(f"{cache.name}.integrity.json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _drop_the_record])
def test_a_damaged_feature_cache_is_extracted_again(run: Path, tmp_path: Path, capsys, damage) -> None:
    config_file = tmp_path / "params.yaml"
    values = demo_config(run).to_dict()
    values["evaluate"]["cache_dir"] = str(tmp_path / "features")
    config_file.write_text(yaml.safe_dump(values))
    checkpoint = run / "run" / "checkpoints" / "epoch0002.pt"

    def knn(out: Path) -> str:
        args = ["knn", str(checkpoint), "--out", str(out), "--config", str(config_file), "--no-progress"]
        assert main(args) == 0
        return capsys.readouterr().err

    knn(tmp_path / "intact.json")
    # the bank (train) and the queries (test)
    caches = sorted((tmp_path / "features").glob("*.pt"))
    assert [cache.name.split("-")[1] for cache in caches] == ["test", "train"]
    queries = caches[0]
    intact = queries.read_bytes()
    damage(queries)

    warnings = knn(tmp_path / "again.json")
    assert f"warning: feature cache {queries} " in warnings
    assert warnings.count("extracting the features again") == 1
    assert "Traceback" not in warnings
    assert queries.read_bytes() == intact  # extracted again, bit for bit
    assert comparable_metrics(tmp_path / "again.json") == comparable_metrics(tmp_path / "intact.json")


def test_linear_probe_and_few_label_logistic_regression(run: Path, tmp_path: Path) -> None:
    checkpoint = run / "run" / "checkpoints" / "epoch0002.pt"
    config = demo_config(run)
    linear = run_linear(checkpoint, config, tmp_path / "linear.json", progress=False)
    assert linear["feature_dim"] == 4 * 192 and len(linear["sweep"]) == 3 * 2
    assert linear["selected"]["val_top1"] == max(row["best_val_top1"] for row in linear["sweep"])
    assert linear["test"]["top1"] > 0.35 and linear["test"]["coarse_top1"] >= linear["test"]["top1"]

    fewshot = run_fewshot(checkpoint, config, tmp_path / "fewshot.json", progress=False)
    one, ten = fewshot["fractions"]["0.01"], fewshot["fractions"]["0.1"]
    # 21 per class in train: 0.21 → at least 1, 2.1 → 2
    assert one["labelled_images"] == 10 and ten["labelled_images"] == 20
    assert ten["test_top1"] > 0.3
    assert (
        json.loads((tmp_path / "fewshot.json").read_text())["provenance"]["config_sha256"] == config.digest()
    )
