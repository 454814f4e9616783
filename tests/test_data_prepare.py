"""`mugs prepare` on real files: every kind of bad input, determinism, the cache and the val hold-out."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mugs.config import DataConfig
from mugs.data import prepare as prepare_module
from mugs.data import sources
from mugs.data.prepare import mean_std, run_prepare, stratified_holdout
from mugs.data.sources import FASHION_MNIST_SYSTEM_DIR, DataError, install_demo_data


def solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (4, 4), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png`` with a distinct colour per file, so no two hashes collide."""
    for s, (split, classes) in enumerate(splits.items()):
        for c, (name, count) in enumerate(classes.items()):
            for i in range(count):
                solid(root / split / name / f"{i}.png", (10 * s, 10 * c, i))
    return root


def solid_dir(root: Path, name: str) -> Path:
    (root / "train" / name).mkdir(parents=True, exist_ok=True)
    return root / "train" / name


def config(tmp_path: Path, root: Path, **kwargs) -> DataConfig:
    values = {"source": "imagefolder", "root": str(root), "prepared_dir": str(tmp_path / "out"), "workers": 1}
    return DataConfig(**{**values, **kwargs})


def read_rows(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"manifest-{split}.jsonl").read_text().splitlines()]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_missing_and_empty_root_name_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
        run_prepare(config(tmp_path, tmp_path / "nowhere"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'} is empty")):
        run_prepare(config(tmp_path, tmp_path / "empty"), progress=False)
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has no train/ directory"):
        run_prepare(config(tmp_path, tmp_path / "flat"), progress=False)


def test_class_directory_without_images_is_an_error(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 3}})
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(
        DataError, match=re.escape(f"class directory {root / 'train' / 'dog'} contains no images")
    ):
        run_prepare(config(tmp_path, root), progress=False)


def test_class_lists_that_differ_between_splits_are_an_error(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "eel": 1}})
    with pytest.raises(DataError, match=r"only in val: \['eel'\], only in train: \['dog'\]"):
        run_prepare(config(tmp_path, root), progress=False)
    # a configured subset present in both splits is fine
    summary = run_prepare(config(tmp_path, root, classes=["cat"]), progress=False)
    assert summary.counts == {"train": 2, "val": 1}


def bad_tree(root: Path, monkeypatch) -> dict[str, str]:
    """A class full of broken files next to good ones; returns ``{relative path: expected reason}``."""
    tree(root, {"train": {"cat": 4, "dog": 4}})
    cat = root / "train" / "cat"
    (cat / "empty.jpg").touch()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(cat / "whole.jpg", quality=90)
    data = (cat / "whole.jpg").read_bytes()
    (cat / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (cat / "whole.jpg").unlink()
    (cat / "text.jpg").write_text("this is not a JPEG\n")
    os.symlink("loop.jpg", cat / "loop.jpg")
    os.symlink("gone.jpg", cat / "dangling.jpg")
    os.symlink("..", cat / "up")  # a directory loop: cat/up -> train
    os.mkfifo(cat / "pipe.jpg")
    solid(cat / "locked.jpg", (1, 2, 3), fmt="JPEG").chmod(0)
    if os.geteuid() == 0:
        # root reads mode-000 files, so simulate the EACCES a normal user gets from open()
        real_read = prepare_module._read_file

        def read(path: str) -> bytes:
            if path.endswith("locked.jpg"):
                raise PermissionError(13, "Permission denied", path)
            return real_read(path)

        monkeypatch.setattr(prepare_module, "_read_file", read)
    return {
        "train/cat/dangling.jpg": "dangling symlink to gone.jpg",
        "train/cat/empty.jpg": "zero-byte file",
        "train/cat/locked.jpg": "unreadable: permission denied",
        "train/cat/loop.jpg": "symlink loop",
        "train/cat/pipe.jpg": "not a regular file",
        "train/cat/text.jpg": "not an image",
        "train/cat/truncated.jpg": "truncated",
        "train/cat/up": "symlink loop: points back to its ancestor",
    }


def test_bad_files_are_skipped_and_reported_with_reasons(tmp_path, monkeypatch):
    expected = bad_tree(tmp_path / "data", monkeypatch)
    summary = run_prepare(config(tmp_path, tmp_path / "data", val_fraction=0.5), progress=False)
    out = tmp_path / "out"
    report = json.loads((out / "bad-files.json").read_text())
    assert [b["path"] for b in report] == sorted(expected)
    for entry in report:
        assert expected[entry["path"]] in entry["reason"], entry
        assert entry["split"] == "train"
    assert summary.bad_files == 8 and json.loads((out / "summary.json").read_text())["bad_files"] == 8
    paths = sorted(r["path"] for split in ("train", "val") for r in read_rows(out, split))
    assert paths == [f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(4)]


def test_on_bad_image_error_fails_and_keeps_the_previous_preparation(tmp_path, monkeypatch):
    root = tree(tmp_path / "data", {"train": {"cat": 4, "dog": 4}})
    run_prepare(config(tmp_path, root), progress=False)
    before = snapshot(tmp_path / "out")
    (root / "train" / "dog" / "broken.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"1 bad file\(s\).*\n  train/dog/broken.jpg: not an image"):
        run_prepare(config(tmp_path, root, on_bad_image="error"), progress=False)
    assert snapshot(tmp_path / "out") == before
    report = json.loads((tmp_path / "out.cache" / "bad-files.json").read_text())
    assert [b["path"] for b in report] == ["train/dog/broken.jpg"]
    # a class whose every image is bad is an error too, even when skipping
    for path in (root / "train" / "cat").iterdir():
        path.write_bytes(b"")
    with pytest.raises(
        DataError, match=re.escape(f"class directory {root / 'train' / 'cat'} has no readable images")
    ):
        run_prepare(config(tmp_path, root), progress=False)
    assert snapshot(tmp_path / "out") == before
    assert not list(tmp_path.glob(".out.*")), "no staging or previous directory left behind"


def test_refuses_to_replace_a_directory_that_is_not_a_preparation(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 2}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing to replace it"):
        run_prepare(config(tmp_path, root), progress=False)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_interrupted_swap_is_recovered(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    run_prepare(config(tmp_path, root), progress=False)
    before = snapshot(tmp_path / "out")
    # a crash between the two renames of the swap leaves only the hidden previous copy
    os.replace(tmp_path / "out", tmp_path / ".out.previous-999999")
    (tmp_path / ".out.staging-999999").mkdir()
    (root / "train" / "cat" / "0.png").write_text("garbage")
    with pytest.raises(DataError):
        run_prepare(config(tmp_path, root, on_bad_image="error"), progress=False)
    assert snapshot(tmp_path / "out") == before
    assert not (tmp_path / ".out.staging-999999").exists()


def test_modes_and_names_are_converted_to_rgb(tmp_path):
    root = tmp_path / "data"
    tree(root, {"train": {"cat": 2}, "val": {"cat": 1}})
    cat = root / "train" / "cat"
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    palette.save(cat / "palette.png")
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(cat / "deep.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cat / "cmyk.jpg", quality=95)
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [255, 255, 255, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(cat / "alpha.png")
    solid(cat / "with space ü 猫.png", (7, 8, 9))
    summary = run_prepare(config(tmp_path, root), progress=False)
    assert summary.bad_files == 0
    modes = json.loads((tmp_path / "out" / "summary.json").read_text())["modes"]
    assert modes == {"CMYK": 1, "I;16": 1, "P": 1, "RGB": 4, "RGBA": 1}
    rows = {r["path"]: r for r in read_rows(tmp_path / "out", "train")}
    assert "train/cat/with space ü 猫.png" in rows
    assert rows["train/cat/deep.png"]["size"] == (cat / "deep.png").stat().st_size

    from mugs.data.datasets import open_split

    train = open_split(tmp_path / "out", "train")
    images = {train.path(i): np.asarray(train[i][0]) for i in range(len(train))}
    assert images["train/cat/palette.png"].tolist() == [[[10, 20, 30], [200, 100, 50]]]
    # 16-bit values keep their range: >> 8, not clipped at 255
    assert images["train/cat/deep.png"].tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]
    assert np.abs(images["train/cat/cmyk.jpg"].astype(int) - [255, 0, 0]).max() <= 3
    # premultiplied alpha: round(255 * 128 / 255) = 128
    assert images["train/cat/alpha.png"].tolist() == [[[200, 100, 50], [0, 0, 0], [128, 128, 128]]]
    assert images["train/cat/with space ü 猫.png"][0, 0].tolist() == [7, 8, 9]


def test_stats_are_exact_and_independent_of_worker_processes(tmp_path):
    root = tmp_path / "data"
    Image.fromarray(np.array([[[0, 51, 255], [255, 51, 0]]], np.uint8)).save(solid_dir(root, "cat") / "a.png")
    Image.fromarray(np.array([[[0, 102, 255]]], np.uint8)).save(solid_dir(root, "dog") / "b.png")
    solid(root / "val" / "cat" / "c.png", (255, 255, 255))
    solid(root / "val" / "dog" / "d.png", (255, 255, 255))
    run_prepare(config(tmp_path, root), progress=False)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    # R = (0, 1, 0), G = (.2, .2, .4), B = (1, 0, 1) over the three train pixels
    assert stats["mean"] == pytest.approx([1 / 3, 0.8 / 3, 2 / 3], abs=1e-12)
    assert stats["std"] == pytest.approx([2**0.5 / 3, (0.08 - (0.8 / 3) ** 2) ** 0.5, 2**0.5 / 3], abs=1e-12)
    assert stats["pixels"] == 3 and stats["images"] == 2
    one = snapshot(tmp_path / "out")
    shutil.rmtree(tmp_path / "out.cache")  # decode again, this time in two worker processes
    summary = run_prepare(config(tmp_path, root, workers=2), progress=False)
    assert summary.decoded == 4
    assert snapshot(tmp_path / "out") == one


def test_mean_std_matches_float64_and_is_exact_for_any_partition():
    values = np.random.default_rng(1).integers(0, 256, (1000, 3), dtype=np.int64)
    parts = [values[:1], values[1:400], values[400:]]
    sums = [sum(int(p[:, c].sum()) for p in parts) for c in range(3)]
    squares = [sum(int((p[:, c] ** 2).sum()) for p in parts) for c in range(3)]
    mean, std = mean_std(sums, squares, 1000)
    assert mean == pytest.approx((values / 255).mean(0).tolist(), rel=1e-12)
    assert std == pytest.approx((values / 255).std(0).tolist(), rel=1e-12)
    assert mean_std([5 * 255] * 3, [5 * 255**2] * 3, 5) == ([1.0] * 3, [0.0] * 3)


def test_duplicates_across_train_and_val_warn(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 2}, "val": {"cat": 1}})
    shutil.copy(root / "train" / "cat" / "1.png", root / "val" / "cat" / "copy.png")
    summary = run_prepare(config(tmp_path, root), progress=False)
    assert summary.duplicates == 1
    assert "train/cat/1.png" in summary.warnings[0] and "val/cat/copy.png" in summary.warnings[0]
    duplicates = json.loads((tmp_path / "out" / "duplicates.json").read_text())
    assert [d["files"] for d in duplicates] == [["train:train/cat/1.png", "val:val/cat/copy.png"]]


def test_cache_decodes_only_changed_files_and_output_is_identical(tmp_path):
    root = tree(tmp_path / "data", {"train": {"cat": 5, "dog": 5}})
    first = run_prepare(config(tmp_path, root), progress=False)
    before = snapshot(tmp_path / "out")
    assert (first.decoded, first.cached) == (10, 0)
    again = run_prepare(config(tmp_path, root), progress=False)
    assert (again.decoded, again.cached) == (0, 10)
    assert snapshot(tmp_path / "out") == before
    solid(root / "train" / "dog" / "3.png", (99, 99, 99), size=(5, 5))
    changed = run_prepare(config(tmp_path, root), progress=False)
    assert (changed.decoded, changed.cached) == (1, 9)
    assert snapshot(tmp_path / "out")["stats.json"] != before["stats.json"]


def test_a_warm_rerun_starts_no_worker_process(tmp_path, monkeypatch):
    root = tree(tmp_path / "data", {"train": {"cat": 3, "dog": 3}})
    first = run_prepare(config(tmp_path, root, workers=2), progress=False)
    before = snapshot(tmp_path / "out")

    def no_processes(*args, **kwargs):
        raise AssertionError("a process pool was started although every file was cached")

    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", no_processes)
    again = run_prepare(config(tmp_path, root, workers=2), progress=False)
    assert (first.decoded, again.decoded, again.cached) == (6, 0, 6)
    assert snapshot(tmp_path / "out") == before


def test_held_out_val_split_and_cap(tmp_path):
    root = tree(tmp_path / "data", {"train": {"a": 10, "b": 10, "c": 10}, "test": {"a": 1, "b": 1, "c": 1}})
    summary = run_prepare(config(tmp_path, root, val_fraction=0.2), progress=False)
    assert summary.counts == {"train": 24, "val": 6, "test": 3}
    val = read_rows(tmp_path / "out", "val")
    assert np.bincount([r["label"] for r in val]).tolist() == [2, 2, 2]
    train = read_rows(tmp_path / "out", "train")
    assert not {r["path"] for r in val} & {r["path"] for r in train}
    assert [r["path"] for r in train] == sorted(r["path"] for r in train)
    capped = run_prepare(config(tmp_path, root, max_per_class=5, val_fraction=0.2), progress=False)
    assert capped.counts == {"train": 12, "val": 3, "test": 3}
    assert {r["path"] for r in read_rows(tmp_path / "out", "val")} <= {
        f"train/{c}/{i}.png" for c in "abc" for i in range(5)
    }


def test_stratified_holdout_is_seeded_and_per_class():
    labels = np.repeat(np.arange(3), [10, 2, 1])
    mask = stratified_holdout(labels, 0.2, seed=0)
    assert np.bincount(labels[mask], minlength=3).tolist() == [2, 1, 0]
    assert (stratified_holdout(labels, 0.2, seed=0) == mask).all()
    picks = {tuple(np.flatnonzero(stratified_holdout(labels, 0.2, seed=s) & (labels == 0))) for s in range(5)}
    assert len(picks) > 1
    # one class's draw does not depend on the others being present
    assert (stratified_holdout(labels[:10], 0.2, seed=0) == mask[:10]).all()


def test_install_demo_data_errors_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist"):
        install_demo_data(tmp_path / "dest", system_dir=tmp_path / "missing")
    if os.geteuid() == 0:
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get")
        calls = []

        class Failed:
            returncode, stderr = 100, "E: Unable to locate package"

        def run(command, **kwargs):
            calls.append(command)
            return Failed()

        monkeypatch.setattr(sources.subprocess, "run", run)
        with pytest.raises(DataError, match=r"(?s)exit 100.*Unable to locate package"):
            install_demo_data(tmp_path / "dest", system_dir=tmp_path / "missing")
        assert calls == [["apt-get", "install", "-y", "dataset-fashion-mnist"]]


needs_fashion = pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion") / "fashion-mnist"
    install_demo_data(root)
    return root


@needs_fashion
def test_install_demo_data_copies_byte_identical_files(fashion_root):
    for path in sorted(FASHION_MNIST_SYSTEM_DIR.iterdir()):
        assert (fashion_root / path.name).read_bytes() == path.read_bytes()
    stamp = (fashion_root / "train-labels-idx1-ubyte.gz").stat().st_mtime_ns
    install_demo_data(fashion_root)
    assert (fashion_root / "train-labels-idx1-ubyte.gz").stat().st_mtime_ns == stamp


@needs_fashion
def test_fashion_mnist_manifest_is_byte_identical_across_runs(tmp_path, fashion_root):
    settings = {"root": str(fashion_root), "max_per_class": 20, "workers": 1}
    first = run_prepare(DataConfig(prepared_dir=str(tmp_path / "a"), **settings), progress=False)
    run_prepare(DataConfig(prepared_dir=str(tmp_path / "b"), **settings), progress=False)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert first.counts == {"train": 180, "val": 20, "test": 200}
    val = read_rows(tmp_path / "a", "val")
    assert np.bincount([r["label"] for r in val]).tolist() == [2] * 10
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    assert classes["coarse_classes"] == ["tops", "trousers-dresses", "footwear", "bags"]
    assert classes["coarse_of_class"] == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]
    row = read_rows(tmp_path / "a", "test")[0]
    from mugs.data.sources import fashion_mnist_split

    _, labels = fashion_mnist_split(fashion_root, "test")
    assert row["path"] == "t10k-images-idx3-ubyte.gz#0" and row["label"] == labels[0] == 9
    assert row["coarse"] == 2 and row["size"] == 784


@needs_fashion
def test_fashion_mnist_class_subset_and_stats(tmp_path, fashion_root):
    cfg = DataConfig(
        root=str(fashion_root),
        prepared_dir=str(tmp_path / "out"),
        classes=["Bag", "Trouser"],
        max_per_class=3,
    )
    run_prepare(cfg, progress=False)
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["classes"] == ["Trouser", "Bag"]
    from mugs.data.sources import fashion_mnist_split

    images, labels = fashion_mnist_split(fashion_root, "train")
    train = read_rows(tmp_path / "out", "train")
    rows = [int(r["path"].rsplit("#", 1)[1]) for r in train]
    assert [r["label"] for r in train] == [{1: 0, 8: 1}[labels[i]] for i in rows]
    pixels = images[rows] / 255
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["mean"] == pytest.approx([pixels.mean()] * 3, rel=1e-12)
    assert stats["std"] == pytest.approx([pixels.std()] * 3, rel=1e-12)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    (tmp_path / "fm").mkdir()
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte.gz.*mugs demo-data"):
        run_prepare(DataConfig(root=str(tmp_path / "fm"), prepared_dir=str(tmp_path / "o")), progress=False)


@pytest.mark.parametrize(
    ("target", "reason"), [("self", "symlink loop (too many levels"), ("..", "points back")]
)
def test_a_class_directory_that_loops_is_reported_and_never_a_class(tmp_path, target, reason):
    """A class directory linked to itself, or to its split's parent (``loop -> ..``): in
    bad-files.json, not a class (the second made a class of every image again)."""
    root = tree(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    os.symlink(target, root / "train" / "self")
    run_prepare(config(tmp_path, root, val_fraction=0.5), progress=False)
    out = tmp_path / "out"
    report = json.loads((out / "bad-files.json").read_text())
    assert [(b["path"], b["split"]) for b in report] == [("train/self", "train")]
    assert reason in report[0]["reason"]
    assert json.loads((out / "summary.json").read_text())["classes"] == 2
    paths = sorted(r["path"] for split in ("train", "val") for r in read_rows(out, split))
    assert paths == [f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(2)]
