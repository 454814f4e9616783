"""The baselines: the networks as pretraining initialises them, and raw-pixel kNN on a prepared split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mugs.cli import main
from mugs.config import Config, DataConfig, config_from_dict
from mugs.data.prepare import run_prepare
from mugs.evaluation.baselines import pixel_features
from mugs.evaluation.features import FeatureSet
from mugs.evaluation.knn import knn_evaluate
from mugs.testing.configs import tiny_training_config
from mugs.testing.synthetic import SyntheticImages
from mugs.training.checkpoint import load_checkpoint
from mugs.training.engine import Trainer

MEAN_STD = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# 8-px images: the evaluation view of a 7-px crop resizes them to round(7 · 256/224) = 8 (unchanged)
# and centre-crops rows and columns 0..6, so the expected pixels can be read straight off the files
SIDE, CROP = 8, 7
CLASSES = ("a", "b", "c", "d")
COARSE = {"a": "x", "b": "x", "c": "y", "d": "y"}


def test_random_init_checkpoint_holds_the_networks_pretraining_starts_from(tmp_path: Path) -> None:
    config = tiny_training_config(tmp_path / "run", None, "train.seed=3")
    saved = _init_checkpoint(config, tmp_path / "init.pt")
    trainer = Trainer(config, SyntheticImages(size=24, side=20), mean_std=MEAN_STD)
    for part, network in (("student", trainer.student), ("teacher", trainer.teacher)):
        expected = network.state_dict()
        assert saved[part].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(saved[part][name], value), f"{part}.{name} differs"
    assert saved["config"] == config.to_dict()

    # another seed, other weights: the checkpoint follows train.seed
    config.train.seed = 4
    other = _init_checkpoint(config, tmp_path / "other.pt")
    first = next(iter(saved["teacher"]))
    assert not torch.equal(other["teacher"][first], saved["teacher"][first])


def _init_checkpoint(config: Config, out: Path) -> dict:
    """``mugs init-checkpoint`` with ``config`` written out as its parameter file; the checkpoint."""
    params = out.with_suffix(".yaml")
    params.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["init-checkpoint", "--out", str(out), "--config", str(params)]) == 0
    return load_checkpoint(out)


def _prepared(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 6), ("val", 2), ("test", 5)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                # dim noise with a bright pair of rows per class: cosine similarity tells the classes apart
                pixels = rng.integers(0, 60, (SIDE, SIDE), dtype=np.uint8)
                pixels[2 * c : 2 * c + 2] += 180
                Image.fromarray(pixels, "L").save(root / split / name / f"{i}.png")
    (root / "coarse.json").write_text(json.dumps(COARSE))
    prepared = tmp_path / "prepared"
    run_prepare(
        DataConfig(source="imagefolder", root=str(root), prepared_dir=str(prepared), workers=1),
        progress=False,
    )
    return prepared


def _pixels_from_files(prepared: Path, split: str) -> FeatureSet:
    """The expected rows, read with PIL from the files the manifest lists, in manifest order."""
    manifest = [json.loads(line) for line in (prepared / f"manifest-{split}.jsonl").read_text().splitlines()]
    root = Path(json.loads((prepared / "summary.json").read_text())["root"])
    rows, labels, coarse = [], [], []
    for entry in manifest:
        image = np.asarray(Image.open(root / entry["path"]).convert("L"), dtype=np.float32) / 255
        rows.append(image[:CROP, :CROP].ravel())
        name = Path(entry["path"]).parent.name
        labels.append(CLASSES.index(name))
        coarse.append(sorted(set(COARSE.values())).index(COARSE[name]))
    return FeatureSet(
        torch.from_numpy(np.stack(rows)),
        torch.tensor(labels),
        torch.tensor(coarse),
        list(CLASSES),
        sorted(set(COARSE.values())),
    )


def test_raw_pixel_knn_votes_on_the_grey_centre_crop_with_the_runs_settings(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path)
    config = config_from_dict(
        {
            "preset": "demo",
            "augment": {"global_size": CROP},
            "data": {"source": "imagefolder", "root": str(tmp_path / "data"), "prepared_dir": str(prepared)},
            "evaluate": {"knn_k": [3, 10], "knn_temperature": 0.05},
        }
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "raw-pixels" / "knn.json"
    assert main(["raw-pixel-knn", "--out", str(out), "--config", str(params), "--no-progress"]) == 0

    written = json.loads(out.read_text())
    expected = knn_evaluate(
        _pixels_from_files(prepared, "train"),
        _pixels_from_files(prepared, "test"),
        ks=[3, 10],
        temperature=0.05,
    )
    for key in ("fine", "coarse", "bank_size", "queries", "temperature"):
        assert written[key] == expected[key], key
    assert written["bank_size"] == 24 and written["queries"] == 20
    assert written["split"] == "test" and written["evaluation"] == "knn"
    # provenance as for every metrics file: no checkpoint, the prepared data's hash
    assert written["provenance"]["checkpoint"] is None
    assert written["provenance"]["data"]["manifests_sha256"]
    # the pixels separate these classes: far above the 25 % of chance
    assert written["fine"]["3"]["top1"] > 0.9


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pixel_rows_keep_the_split_order_across_batches_and_loader_processes(
    tmp_path: Path, num_workers: int
) -> None:
    prepared = _prepared(tmp_path)
    read = pixel_features(prepared, "train", CROP, batch_size=5, num_workers=num_workers)
    expected = _pixels_from_files(prepared, "train")
    assert torch.equal(read.features, expected.features)
    assert torch.equal(read.labels, expected.labels)
    assert torch.equal(read.coarse_labels, expected.coarse_labels)
