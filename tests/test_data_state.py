"""The data's fingerprint (``mugs data-state``): a stat pass that changes with every change prepare would
see, and a file rewritten only when it does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_data_prepare import solid, tree

from mugs.config import DataConfig
from mugs.data.sources import DataError
from mugs.data.state import data_state, refresh_data_state, state_path


@pytest.fixture
def config(tmp_path: Path) -> DataConfig:
    root = tree(tmp_path / "data", {"train": {"a": 3, "b": 3}})
    return DataConfig(source="imagefolder", root=str(root), prepared_dir=str(tmp_path / "results/data"))


def test_refresh_rewrites_the_file_only_when_the_data_changed(config: DataConfig) -> None:
    path = state_path(config)
    assert path == Path(f"{config.prepared_dir}.state.json")
    assert refresh_data_state(config)
    written = path.stat().st_mtime_ns
    assert json.loads(path.read_text())["root"] == config.root
    assert not refresh_data_state(config)
    assert path.stat().st_mtime_ns == written
    os.utime(Path(config.root) / "train/a/0.png", ns=(1, 1))  # same bytes, another mtime
    assert refresh_data_state(config)


def test_every_change_prepare_would_see_changes_the_fingerprint(config: DataConfig) -> None:
    root = Path(config.root)
    seen = {data_state(config)["sha256"]}
    changes = [
        lambda: solid(root / "train/a/1.png", (1, 2, 3)),  # modified, same size
        lambda: solid(root / "train/b/new.png", (9, 9, 9)),  # added
        lambda: (root / "train/b/0.png").unlink(),  # removed
        lambda: solid(root / "train/b/sub/deep.png", (4, 4, 4)),  # added in a subfolder
        lambda: (root / "train/a/empty.png").write_bytes(b""),  # a bad file prepare reports
        lambda: (root / "coarse.json").write_text('{"a": "x", "b": "x"}'),
    ]
    for change in changes:
        change()
        fingerprint = data_state(config)["sha256"]
        assert fingerprint not in seen
        seen.add(fingerprint)
    assert data_state(config)["sha256"] in seen  # untouched: the same


def test_a_missing_root_is_named(tmp_path: Path) -> None:
    config = DataConfig(source="imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere does not exist"):
        data_state(config)
