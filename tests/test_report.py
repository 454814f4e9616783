"""`mugs report`: every figure and table from tiny runs, missing inputs noted, attention maps exact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mugs.cli import main
from mugs.config import DataConfig, config_from_dict
from mugs.data.prepare import run_prepare
from mugs.model import build_networks
from mugs.model.backbone import VIT_SIZES, MugsViT
from mugs.report import figures
from mugs.report.attention import last_block_cls_attention
from mugs.report.runs import METRICS, read_run
from mugs.rundir import RunDir
from mugs.training.checkpoint import FORMAT, atomic_save

FIGURES = ("curves.png", "knn_checkpoints.png", "accuracy.png", "tsne.png")


@pytest.fixture
def tiny_arch(monkeypatch):
    # a 2-block, 16-wide "vit_tiny" keeps feature extraction and attention to milliseconds
    monkeypatch.setitem(VIT_SIZES, "vit_tiny", (16, 2, 2))


def _prepared(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 3), ("val", 2), ("test", 5)):
        for c, name in enumerate(("a", "b", "c", "d")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(60 * c + rng.integers(0, 40, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / name / f"{i}.png")
    (root / "coarse.json").write_text(json.dumps({"a": "x", "b": "x", "c": "y", "d": "y"}))
    out = tmp_path / "prepared"
    run_prepare(
        DataConfig(source="imagefolder", root=str(root), prepared_dir=str(out), workers=1), progress=False
    )
    return out


def _iteration(step: int, *, groups: bool) -> dict:
    record = {
        "type": "iteration",
        "epoch": (step - 1) // 4,
        "global_iteration": step,
        "loss": 9.0 - 0.1 * step,
        "instance": 8.0 - 0.1 * step,
        "lr": 1e-4 * step,
        "weight_decay": 0.04 + 0.01 * step,
        "teacher_momentum": 0.996,
        "teacher_temperature": 0.04,
        "teacher_feature_std": 0.05,
        "effective_rank": 10.0 + step,
        "images_per_second": 100.0,
        "data_wait_fraction": 0.1,
        "warnings": [],
    }
    if groups:
        record.update({"local_group": 7.0, "group": 6.0, "group_entropy_ratio": 0.9})
    return record


def _tiny_run(tmp_path: Path, name: str, prepared: Path, *, groups: bool) -> Path:
    config = config_from_dict(
        {
            "model": {
                "arch": "vit_tiny",
                "patch_size": 4,
                "hidden_dim": 16,
                "out_dim": 8,
                "predictor_hidden_dim": 16,
                "group_out_dim": 32,
            },
            "loss": {
                "instance_queue_size": 16,
                "local_group_queue_size": 16,
                "local_group_weight": 1.0 if groups else 0.0,
                "group_weight": 1.0 if groups else 0.0,
            },
            "augment": {"global_size": 8, "local_size": 4, "n_local": 0},
            "data": {"source": "imagefolder", "prepared_dir": str(prepared)},
            "evaluate": {"cache_dir": str(tmp_path / "features"), "num_workers": 0, "device": "cpu"},
        }
    )
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    student, teacher = build_networks(config)
    for epoch in (1, 2):
        payload = {
            "format": FORMAT,
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "config": config.to_dict(),
            "epoch": epoch,
        }
        atomic_save(payload, RunDir(run).kept(epoch))
    lines = [json.dumps(_iteration(step, groups=groups)) for step in (2, 4, 6, 8)]
    lines.insert(2, json.dumps({"type": "epoch", "epoch": 1, "global_iteration": 4}))
    lines.append('{"type": "iteration", "global_it')  # cut short by a crash
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _full_metrics(run: Path) -> None:
    """Metric files in the formats the evaluation commands write (plus provenance we ignore)."""
    evaluation = run / "eval"
    _write(
        evaluation / "knn.json",
        {
            "fine": {"10": {"top1": 0.5, "top5": 0.9}, "20": {"top1": 0.8125, "top5": 0.95}},
            "coarse": {"10": {"top1": 0.6, "top5": 1.0}, "20": {"top1": 0.875, "top5": 1.0}},
            "provenance": {},
        },
    )
    _write(evaluation / "linear.json", {"test": {"top1": 0.7, "top5": 0.9, "coarse_top1": 0.9}})
    _write(
        evaluation / "fewshot.json",
        {"fractions": {"0.01": {"test_top1": 0.3}, "0.1": {"test_top1": 0.45, "test_coarse_top1": 0.7}}},
    )
    _write(evaluation / "finetune.json", {"fine": {"top1": 0.85, "top5": 1.0}, "coarse": {"top1": 0.95}})
    _write(
        run / "selection.json",
        {
            "selected": {"epoch": 2},
            "scores": [
                {"epoch": 1, "val_top1": 0.4, "val_coarse_top1": 0.6},
                {"epoch": 2, "val_top1": 0.5, "val_coarse_top1": 0.7},
            ],
        },
    )


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.stat().st_size > 8_000, f"{path} is suspiciously small"
    with Image.open(path) as image:
        width, height = image.size
        assert 500 <= width <= 4000 and 200 <= height <= 4000, (path, image.size)
        # not a blank canvas: many distinct colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, path


def test_report_of_two_runs_renders_every_figure_and_the_summary(tmp_path, tiny_arch):
    prepared = _prepared(tmp_path)
    full = _tiny_run(tmp_path, "full", prepared, groups=True)
    instance = _tiny_run(tmp_path, "instance", prepared, groups=False)
    _full_metrics(full)
    _write(instance / "eval" / "knn.json", {"fine": {"20": {"top1": 0.625}}})  # no coarse labels

    out = tmp_path / "report"
    code = main(
        ["report", "--runs", str(full), str(instance), "--out", str(out), "--device", "cpu", "--no-progress"]
    )
    assert code == 0
    for name in (*FIGURES, "attention-full.png", "attention-instance.png"):
        _check_png(out / name)

    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["full", "instance"]
    assert summary["runs"][0]["metrics"] == {
        "knn_fine": 0.8125,
        "knn_coarse": 0.875,
        "linear_fine": 0.7,
        "linear_coarse": 0.9,
        "fewshot_1": 0.3,
        "fewshot_10": 0.45,
        "finetune_fine": 0.85,
        "finetune_coarse": 0.95,
    }
    assert summary["runs"][0]["selected_epoch"] == 2
    second = summary["runs"][1]
    assert second["metrics"]["knn_fine"] == 0.625
    assert all(v is None for k, v in second["metrics"].items() if k != "knn_fine")
    assert any("no linear.json" in note for note in second["notes"])
    assert any("no selection.json" in note for note in second["notes"])
    assert any("log.jsonl:6 is not JSON" in note for note in second["notes"])

    table = (out / "summary.md").read_text().splitlines()
    header = table[0]
    for metric in METRICS:
        assert metric.label in header
    assert table[2] == "| full | 81.2 | 87.5 | 70.0 | 90.0 | 30.0 | 45.0 | 85.0 | 95.0 | 2 |"
    assert table[3] == "| instance | 62.5 | — | — | — | — | — | — | — | — |"

    with (out / "curves" / "full.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]  # the epoch line and the broken one are skipped
    assert float(rows[1]["lr"]) == pytest.approx(4e-4) and float(rows[3]["effective_rank"]) == 18.0
    with (out / "curves" / "instance.csv").open() as handle:
        columns = csv.DictReader(handle).fieldnames
    assert "group" not in columns and "group_entropy_ratio" not in columns and "instance" in columns
    assert json.loads((out / "curves" / "instance.json").read_text())[0]["step"] == 2


def test_report_of_a_run_with_nothing_but_a_log_still_writes_every_file(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps(_iteration(2, groups=False)) + "\n")
    out = tmp_path / "report"
    assert main(["report", "--runs", str(run), "--out", str(out), "--names", "bare run"]) == 0
    for name in (*FIGURES, "attention-bare_run.png"):
        assert (out / name).stat().st_size > 3_000, name
    summary = json.loads((out / "summary.json").read_text())
    assert all(v is None for v in summary["runs"][0]["metrics"].values())
    assert any("no checkpoint" in note for note in summary["runs"][0]["notes"])
    assert "| bare run | — | — | — | — | — | — | — | — | — |" in (out / "summary.md").read_text()


def test_read_run_prefers_the_eval_dir_and_reads_selection_scores(tmp_path):
    run = tmp_path / "run"
    _write(run / "knn.json", {"fine": {"20": {"top1": 0.1}}})
    _write(run / "eval" / "knn.json", {"fine": {"10": {"top1": 0.3}, "200": {"top1": 0.4}}})
    _write(run / "selection.json", {"scores": [{"epoch": 3, "knn_top1": 0.2}, {"epoch": 1, "val_top1": 0.1}]})
    record = read_run(run)
    # k=20 was not evaluated there: the smallest k stands in
    assert record.metrics(20)["knn_fine"] == 0.3
    assert record.checkpoint_scores() == [{"epoch": 1, "fine": 0.1}, {"epoch": 3, "fine": 0.2}]
    assert record.selected_epoch() is None


def test_last_block_attention_matches_timm_unfused_attention():
    torch.manual_seed(0)
    backbone = MugsViT(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, relation_block=False)
    backbone.eval()
    images = torch.randn(3, 3, 12, 8)  # a 3×2 patch grid, not square
    captured = {}
    attention = backbone.blocks[-1].attn
    attention.fused_attn = False
    attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.update(w=output))
    backbone.forward_features(images)
    maps = last_block_cls_attention(backbone, images)
    assert maps.shape == (3, 2, 3, 2)
    expected = captured["w"][:, :, 0, 1:].reshape(3, 2, 3, 2)
    torch.testing.assert_close(maps, expected)
    # the class token's own share is what the patch maps leave out of 1
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + captured["w"][:, :, 0, 0], torch.ones(3, 2))


def test_baselines_are_rows_of_the_summary_and_bars_of_the_accuracy_figure(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps(_iteration(2, groups=False)) + "\n")
    _write(run / "eval" / "knn.json", {"fine": {"20": {"top1": 0.8}}, "coarse": {"20": {"top1": 0.9}}})
    _write(
        tmp_path / "random-init" / "knn.json",
        {"fine": {"20": {"top1": 0.5}}, "coarse": {"20": {"top1": 0.7}}},
    )
    _write(tmp_path / "random-init" / "linear.json", {"test": {"top1": 0.6, "coarse_top1": 0.75}})
    _write(
        tmp_path / "pixels" / "knn.json", {"fine": {"20": {"top1": 0.65}}, "coarse": {"20": {"top1": 0.8}}}
    )
    drawn = []
    draw = figures.plot_accuracy_bars
    monkeypatch.setattr(
        figures, "plot_accuracy_bars", lambda payload, path: drawn.append(payload) or draw(payload, path)
    )
    out = tmp_path / "report"
    baselines = ["--baseline-names", "run at random init", "raw pixels"]
    baselines += ["--baseline-dirs", str(tmp_path / "random-init"), str(tmp_path / "pixels")]
    assert main(["report", "--runs", str(run), "--out", str(out), "--no-progress", *baselines]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["run"]
    rows = {b["name"]: b for b in summary["baselines"]}
    assert list(rows) == ["run at random init", "raw pixels"]
    assert rows["run at random init"]["metrics"] == {
        **dict.fromkeys(m.key for m in METRICS),
        "knn_fine": 0.5,
        "knn_coarse": 0.7,
        "linear_fine": 0.6,
        "linear_coarse": 0.75,
    }
    assert (
        rows["raw pixels"]["metrics"]["knn_fine"] == 0.65
        and rows["raw pixels"]["metrics"]["linear_fine"] is None
    )
    # a baseline lacks some evaluations by design: no notes about them
    assert rows["raw pixels"]["notes"] == [] and rows["run at random init"]["notes"] == []
    assert drawn == [summary]  # the accuracy figure draws the same rows
    _check_png(out / "accuracy.png")

    table = (out / "summary.md").read_text()
    assert "| run at random init (baseline) | 50.0 | 70.0 | 60.0 | 75.0 | — | — | — | — | — |" in table
    assert "| raw pixels (baseline) | 65.0 | 80.0 | — | — | — | — | — | — | — |" in table
