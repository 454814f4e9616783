"""Datasets read from the manifests of `mugs prepare`: labels, pixels, verification and clear errors."""

from __future__ import annotations

import json
import pickle
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mugs.config import DataConfig
from mugs.data import datasets
from mugs.data.datasets import open_split, read_stats
from mugs.data.prepare import run_prepare
from mugs.data.sources import FASHION_MNIST_SYSTEM_DIR, DataError, fashion_mnist_split, install_demo_data


def prepared_tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for split, count in (("train", 3), ("val", 1)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("L", (2, 3), 40 * c + i).save(root / split / name / f"{i}.png")
    (root / "coarse.json").write_text(json.dumps({"cat": "pet", "dog": "pet"}))
    out = tmp_path / "out"
    run_prepare(
        DataConfig(source="imagefolder", root=str(root), prepared_dir=str(out), workers=1), progress=False
    )
    return out


def test_imagefolder_split_reads_the_manifest_not_the_directory(tmp_path):
    out = prepared_tree(tmp_path)
    # a file added after preparation is not part of the dataset
    Image.new("L", (2, 3), 7).save(tmp_path / "data" / "train" / "cat" / "new.png")
    train = open_split(out, "train", transform=lambda image: np.asarray(image))
    assert len(train) == 6 and train.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.coarse_classes == ["pet"] and train.coarse_labels.tolist() == [0] * 6
    pixels, label = train[4]
    assert label == 1 and pixels.shape == (3, 2, 3) and (pixels == 41).all()
    assert train.path(4) == "train/dog/1.png"
    val = open_split(out, "val")
    image, label = val[1]
    assert image.mode == "RGB" and label == 1 and image.getpixel((0, 0)) == (40, 40, 40)


def test_changed_file_is_detected_at_load_time(tmp_path):
    out = prepared_tree(tmp_path)
    train = open_split(out, "train")
    Image.new("L", (2, 3), 200).save(tmp_path / "data" / "train" / "cat" / "1.png")
    train[0]
    with pytest.raises(DataError, match=r"train/cat/1.png differs from what `mugs prepare` recorded"):
        train[1]


def test_missing_preparation_names_the_path(tmp_path):
    with pytest.raises(
        DataError,
        match=re.escape(f"{tmp_path / 'nothing'} holds no prepared data") + ".*run `mugs prepare` first",
    ):
        open_split(tmp_path / "nothing", "train")
    out = prepared_tree(tmp_path)
    with pytest.raises(
        DataError, match=r"manifest-test.jsonl does not exist \(prepared splits: train, val\)"
    ):
        open_split(out, "test")
    with pytest.raises(DataError, match=r"stats\.json does not exist; run `mugs prepare` first"):
        read_stats(tmp_path / "nothing")


def test_read_stats_returns_mean_and_std_tuples(tmp_path):
    out = prepared_tree(tmp_path)
    mean, std = read_stats(out)
    values = np.array([0, 1, 2, 40, 41, 42]) / 255  # every image is one grey level, 6 pixels each
    assert mean == pytest.approx((values.mean(),) * 3, rel=1e-12)
    assert std == pytest.approx((values.std(),) * 3, rel=1e-12)


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_split_is_served_from_the_arrays(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    install_demo_data(root)
    out = tmp_path / "out"
    run_prepare(DataConfig(root=str(root), prepared_dir=str(out), max_per_class=2, workers=1), progress=False)
    monkeypatch.setattr(datasets, "_ARRAYS", {})
    test = open_split(out, "test")
    assert not datasets._ARRAYS, "nothing is decoded before the first item"
    images, labels = fashion_mnist_split(root, "test")
    image, label = test[3]
    row = int(test.path(3).rsplit("#", 1)[1])
    assert image.mode == "RGB" and image.size == (28, 28)
    assert (np.asarray(image) == images[row][..., None]).all() and label == labels[row]
    assert test.coarse_classes == ["tops", "trousers-dresses", "footwear", "bags"]
    assert test.coarse_labels.tolist() == [[0, 1, 0, 1, 0, 2, 0, 2, 3, 2][c] for c in test.labels]
    assert len(datasets._ARRAYS) == 1
    # pickled for spawned loader workers without the 7.8 MB array, even after it was loaded
    assert len(pickle.dumps(test)) < 10_000


def synthetic_prepared(tmp_path: Path, rows: int, classes: int) -> Path:
    """A prepared directory whose train manifest lists ``rows`` files that need not exist."""
    out = tmp_path / "prepared"
    out.mkdir()
    summary = {"source": "imagefolder", "root": str(tmp_path), "splits": {"train": rows}}
    (out / "summary.json").write_text(json.dumps(summary))
    names = [f"n{c:08d}" for c in range(classes)]
    (out / "classes.json").write_text(json.dumps({"classes": names, "coarse_classes": None}))
    with open(out / "manifest-train.jsonl", "w") as f:
        for i in range(rows):
            c = i % classes
            path = f"train/{names[c]}/{names[c]}_{i}.JPEG"
            digest = f"{i:064x}"
            f.write(
                f'{{"path":"{path}","label":{c},"coarse":null,"size":{100000 + i},"sha256":"{digest}"}}\n'
            )
    return out


def test_a_split_is_read_into_flat_buffers_without_an_object_per_row(tmp_path):
    rows = 50_000
    out = synthetic_prepared(tmp_path, rows, classes=100)
    tracemalloc.start()
    try:
        train = open_split(out, "train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(train) == rows and train.labels[-1] == (rows - 1) % 100 and train.sizes[7] == 100007
    assert train.path(rows - 1) == f"train/n00000099/n00000099_{rows - 1}.JPEG"
    assert train._digests[32 * 5 : 32 * 6].tobytes() == (5).to_bytes(32, "big")
    # the buffers: 4 x 8 bytes of integers, 32 of digest and ~30 of path per row (~4.7 MB); a list of
    # dicts first took ~700 bytes a row (35 MB here)
    buffers = sum(a.nbytes for a in (train.labels, train.sizes, train._digests, train._path_bytes))
    assert peak < 3 * (buffers + train._path_ends.nbytes + 8 * rows), peak
