"""Layered parameter files: later files merged over earlier ones, as Snakemake merges --configfile."""

from __future__ import annotations

from pathlib import Path

import pytest

from mugs.config import ConfigError, files_shaping_run, load_config

BASE = """
optim: {epochs: 3, warmup_epochs: 1, lr: 0.0005}
data: {train_subset: 6400}
train: {output_dir: "results/{run}/pretrain"}
runs:
  demo: {}
  small-lr: {optim: {lr: 0.0001}}
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(BASE)
    return path


def test_a_later_file_changes_one_value_and_keeps_its_neighbours(base: Path, tmp_path: Path) -> None:
    (tmp_path / "more.yaml").write_text("optim: {epochs: 6}\n")
    config = load_config([base, tmp_path / "more.yaml"], run="demo")
    assert (config.optim.epochs, config.optim.lr, config.data.train_subset) == (6, 0.0005, 6400)


def test_a_later_file_adds_a_run_on_top_of_the_shared_values(base: Path, tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text("runs:\n  long: {optim: {epochs: 6}, data: {train_subset: null}}\n")
    files = [base, tmp_path / "long.yaml"]
    long = load_config(files, run="long")
    assert (long.optim.epochs, long.optim.lr, long.data.train_subset) == (6, 0.0005, None)
    assert load_config(files, run="small-lr").optim.lr == 0.0001  # the earlier runs are still there
    assert long.train.output_dir == "results/long/pretrain"


def test_errors_name_every_file(base: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("runs:\n  bad: {optim: {lr: fast}}\n")
    message = r"params\.yaml \+ .*bad\.yaml: optim\.lr: expected float, got 'fast'"
    with pytest.raises(ConfigError, match=message):
        load_config([base, tmp_path / "bad.yaml"], run="bad")


def test_files_shaping_a_run_leave_out_files_that_only_add_other_runs(base: Path, tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text("runs:\n  long: {optim: {epochs: 6}}\n")
    (tmp_path / "lr.yaml").write_text("optim: {lr: 0.001}\n")
    files = [base, tmp_path / "long.yaml", tmp_path / "lr.yaml"]
    assert files_shaping_run(files, "demo") == [str(base), str(tmp_path / "lr.yaml")]
    assert files_shaping_run(files, "long") == [str(p) for p in files]
    # the left-out file cannot change the run: same settings with and without it
    assert load_config(files, run="demo") == load_config(files_shaping_run(files, "demo"), run="demo")
