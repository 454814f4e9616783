"""A dataset read in place: ``data.root`` an absolute, read-only directory outside the repository.

Under Snakemake and under ``dvc repro``, the pipeline's first stages (``prepare`` and the random-init
checkpoint, the cheapest stage after it) run on it without writing anything beside the data, and a
modified, an added and a removed image each rerun ``prepare`` and what follows, while an untouched
tree reruns neither.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from workflow_helpers import RUN, copy_worktree, sh, tiny_params

AFTER_PREPARE = f"results/{RUN}/random-init/checkpoint.pt"


def _image(path: Path, shade: int) -> None:
    Image.new("RGB", (8, 8), (shade, 255 - shade, 7)).save(path, "PNG")


def _read_only_dataset(base: Path) -> Path:
    """``base/datasets/tiny``: 2 classes of 4 train images, read-only for everyone."""
    root = base / "datasets" / "tiny"
    for c, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            _image(root / "train" / name / f"{i}.png", 40 * c + i)
    _set_writable(base / "datasets", False)
    return root


def _set_writable(top: Path, writable: bool) -> None:
    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [top, *top.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~bits)


def _listing(top: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``top`` with its mode, size and mtime."""
    entries = {}
    for path in [top, *top.rglob("*")]:
        info = path.lstat()
        entries[str(path.relative_to(top))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def _modified(root: Path) -> None:
    _image(root / "train/cat/1.png", 200)


def _added(root: Path) -> None:
    _image(root / "train/dog/new.png", 99)


def _removed(root: Path) -> None:
    (root / "train/cat/2.png").unlink()


CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    ("modified", _modified),
    ("added", _added),
    ("removed", _removed),
]


def _repository(base: Path, root: Path) -> Path:
    repo = copy_worktree(base / "repo")
    tiny_params(
        repo, data={"source": "imagefolder", "root": str(root), "max_per_class": None, "val_fraction": 0.25}
    )
    sh("mugs", "dvc-yaml", cwd=repo)
    return repo


def _change(root: Path, change: Callable[[Path], None]) -> None:
    """``change`` the read-only dataset, as its owner would, and make it read-only again."""
    _set_writable(root.parent, True)
    change(root)
    _set_writable(root.parent, False)


@pytest.fixture
def dataset(tmp_path: Path):
    root = _read_only_dataset(tmp_path)
    yield root
    _set_writable(tmp_path / "datasets", True)  # so that pytest can remove it


def _check_reruns(
    dataset: Path, run: Callable[[], list[str]], first: set[str], after_change: set[str]
) -> None:
    outside = dataset.parent  # the data's own folder and everything beside it
    before = _listing(outside)
    assert set(run()) == first
    assert _listing(outside) == before, "something was written beside the data"
    for name, change in CHANGES:
        _change(dataset, change)
        before = _listing(outside)
        assert set(run()) == after_change, f"a {name} image"
        assert _listing(outside) == before, f"something was written beside the data ({name} image)"
    before = _listing(outside)
    assert set(run()) <= after_change - {"prepare", "random_init", "random_init-mugs"}
    assert _listing(outside) == before


@pytest.mark.slow
def test_snakemake_reads_a_read_only_dataset_in_place_and_sees_every_change(
    tmp_path: Path, dataset: Path
) -> None:
    repo = _repository(tmp_path, dataset)
    assert not (repo / "data").exists()

    def run() -> list[str]:
        done = sh(
            "snakemake", "--profile", "profiles/local", AFTER_PREPARE, "--config", "launcher=local", cwd=repo
        )
        return re.findall(r"^(?:local)?rule (\w+):$", done.stdout + done.stderr, re.MULTILINE)

    _check_reruns(dataset, run, first={"prepare", "random_init"}, after_change={"prepare", "random_init"})
    assert (repo / AFTER_PREPARE).is_file()


@pytest.mark.slow
def test_dvc_repro_reads_a_read_only_dataset_in_place_and_sees_every_change(
    tmp_path: Path, dataset: Path
) -> None:
    repo = _repository(tmp_path, dataset)

    def run() -> list[str]:
        done = sh("dvc", "repro", f"random_init-{RUN}", cwd=repo)
        return re.findall(r"Running stage '([^']+)'", done.stdout)

    stages = {"data_state", "prepare", f"random_init-{RUN}"}
    _check_reruns(dataset, run, first=stages, after_change=stages)
    assert (repo / AFTER_PREPARE).is_file()
