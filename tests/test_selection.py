"""Checkpoint selection policies, the published choice, few-label subsets, and metrics provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mugs import selection
from mugs.config import config_from_dict
from mugs.evaluation import features as features_module
from mugs.evaluation import knn as knn_module
from mugs.evaluation.features import FeatureSet
from mugs.evaluation.fewshot import stratified_subset
from mugs.evaluation.metrics_io import data_hash, write_metrics
from mugs.files import file_sha256
from mugs.rundir import SELECTED, SELECTION, RunDir
from mugs.training import checkpoint as ckpt


def fake_run(tmp_path: Path, val_top1: dict[int, float], monkeypatch) -> tuple[Path, list[tuple[str, str]]]:
    """A run whose kept checkpoints score ``val_top1[epoch]``; records the (path, split) extractions."""
    run = tmp_path / "run"
    RunDir(run).checkpoints.mkdir(parents=True)
    for epoch in val_top1:
        RunDir(run).kept(epoch).write_bytes(f"weights of epoch {epoch}".encode())
    extracted: list[tuple[str, str]] = []

    def fake_extract(path, split, config, **kwargs):
        extracted.append((Path(path).name, split))
        return FeatureSet(
            torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), None, ["a"], None, {"path": path}
        )

    def fake_knn(train, queries, *, ks, **kwargs):
        epoch = int(Path(train.meta["path"]).stem.removeprefix("epoch"))
        return {"fine": {str(k): {"top1": val_top1[epoch], "top5": 1.0} for k in ks}}

    monkeypatch.setattr(features_module, "extract_features", fake_extract)
    monkeypatch.setattr(knn_module, "knn_evaluate", fake_knn)
    return run, extracted


CONFIG = config_from_dict({"evaluate": {"selection_k": 7, "device": "cpu"}})


def test_best_knn_picks_the_best_val_score_and_publishes_it(tmp_path: Path, monkeypatch) -> None:
    run, extracted = fake_run(tmp_path, {1: 0.4, 2: 0.7, 3: 0.6}, monkeypatch)
    result = selection.select_checkpoint(run, CONFIG, policy="best_knn")

    assert result["selected"]["epoch"] == 2 and result["policy"] == "best_knn"
    assert [s["val_top1"] for s in result["scores"]] == [0.4, 0.7, 0.6]
    assert result["k"] == 7 and result["split"] == "val"
    assert sorted({split for _, split in extracted}) == ["train", "val"]
    assert len(extracted) == 6
    published = run / SELECTED
    assert os.path.samefile(published, run / "checkpoints" / "epoch0002.pt")
    written = json.loads((run / SELECTION).read_text())
    assert written["selected"]["sha256"] == file_sha256(published)
    assert written["provenance"]["checkpoint_sha256"] == file_sha256(published)
    assert "0.7000" in written["reason"] and set(written["timing"]) == {"seconds"}


def test_ties_go_to_the_later_epoch_and_reselection_replaces_the_link(tmp_path: Path, monkeypatch) -> None:
    run, _ = fake_run(tmp_path, {1: 0.5, 2: 0.5, 3: 0.2}, monkeypatch)
    assert selection.select_checkpoint(run, CONFIG)["selected"]["epoch"] == 2
    last = selection.select_checkpoint(run, CONFIG, policy="last")
    assert last["selected"]["epoch"] == 3 and len(last["scores"]) == 3
    assert os.path.samefile(run / SELECTED, run / "checkpoints" / "epoch0003.pt")


def test_latest_is_the_candidate_when_nothing_was_kept(tmp_path: Path) -> None:
    latest = RunDir(tmp_path).latest
    ckpt.atomic_save({"format": ckpt.FORMAT, "epoch": 0}, latest)
    assert selection.candidate_checkpoints(tmp_path) == [(0, latest)]
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        selection.candidate_checkpoints(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown selection policy"):
        selection.select_checkpoint(tmp_path, CONFIG, policy="best_test")


def test_stratified_subset_is_seeded_with_at_least_one_per_class() -> None:
    labels = np.array([0] * 250 + [1] * 40 + [2] * 3 + [3] * 707)
    subset = stratified_subset(labels, 0.01, seed=5)
    # per class max(1, ⌊0.01 · n + ½⌋): 250 → 3 (2.5 rounds up), 40 → 1 (0.4), 3 → 1 (0.03), 707 → 7
    assert np.bincount(labels[subset]).tolist() == [3, 1, 1, 7]
    assert np.array_equal(subset, np.sort(subset)) and len(set(subset.tolist())) == len(subset)
    assert np.array_equal(subset, stratified_subset(labels, 0.01, seed=5))
    assert not np.array_equal(subset, stratified_subset(labels, 0.01, seed=6))
    tenth = stratified_subset(labels, 0.1, seed=5)
    assert np.bincount(labels[tenth]).tolist() == [25, 4, 1, 71]
    assert set(subset.tolist()) <= set(tenth.tolist())
    assert len(stratified_subset(labels, 1.0, seed=0)) == len(labels)
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, seed=0)


def test_write_metrics_records_provenance_atomically(tmp_path: Path, monkeypatch) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest-train.jsonl").write_text('{"path": "a"}\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    config = config_from_dict(
        {"data": {"prepared_dir": str(prepared), "root": str(tmp_path / "data" / "fm")}}
    )
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"abc")
    monkeypatch.setenv("MUGS_CONTAINER_DIGEST", "sha256:feed")
    monkeypatch.chdir(tmp_path)

    path = write_metrics(
        tmp_path / "out" / "m.json", {"top1": 0.5}, config=config, checkpoint=checkpoint, timing={"s": 1.0}
    )
    written = json.loads(path.read_text())
    provenance = written["provenance"]
    assert written["top1"] == 0.5 and written["timing"] == {"s": 1.0}
    assert (
        provenance["checkpoint_sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert provenance["config_sha256"] == config.digest()
    assert provenance["data"]["dvc_md5"] == "abc123.dir" and len(provenance["data"]["manifests_sha256"]) == 64
    assert provenance["container_digest"] == "sha256:feed"
    assert set(provenance["packages"]) >= {"python", "torch", "torchvision", "timm", "numpy", "mugs"}
    assert list((tmp_path / "out").iterdir()) == [path]  # no temporary left behind
    # a data root outside what data.dvc tracks is identified by its manifests only
    other = config_from_dict({"data": {"prepared_dir": str(prepared), "root": str(tmp_path / "elsewhere")}})
    assert set(data_hash(other)) == {"manifests_sha256"}
    with pytest.raises(ValueError, match="reserved"):
        write_metrics(tmp_path / "x.json", {"timing": 1}, config=config, checkpoint=None)
