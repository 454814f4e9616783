"""`mugs reproduce-paper` end to end on tiny data: a release-layout checkpoint made here is imported,
evaluated with its preset's recipe (the augmented linear probe) and tabled above the paper's row."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from test_interop import TINY, official_memory, official_network

from mugs.cli import main
from mugs.config import config_from_dict
from mugs.losses import MugsObjective
from mugs.model import build_networks
from mugs.report.paper import PAPER_TOP1
from mugs.testing.synthetic import write_imagefolder

REPO = Path(__file__).resolve().parents[1]


def release_checkpoint(path: Path) -> Path:
    """A randomly initialised tiny model saved in the authors' layout (as tests/test_interop.py)."""
    torch.manual_seed(0)
    config = config_from_dict(TINY)
    student, teacher = build_networks(config)
    losses = MugsObjective.from_config(config).losses
    torch.save(
        {
            "student": official_network(student.state_dict(), "module."),
            "teacher": official_network(teacher.state_dict(), ""),
            "student_mem": official_memory(student.memory),
            "teacher_mem": official_memory(teacher.memory),
            "instance-sup.": {
                "queue": losses["instance"].queue,
                "queue_ptr": losses["instance"].queue_pointer,
            },
            "local-group-sup.": {
                "queue": losses["local_group"].queue,
                "queue_ptr": losses["local_group"].queue_pointer,
            },
            "group-sup.": {"center": losses["group"].center},
            "epoch": 100,
        },
        path,
    )
    return path


def test_the_committed_spec_names_every_published_model_and_validates() -> None:
    spec = yaml.safe_load((REPO / "configs/reproduce-paper.yaml").read_text())
    assert set(spec["models"]) == set(PAPER_TOP1)
    for model in spec["models"]:
        assert config_from_dict(spec["shared"], preset=model).evaluate.linear_protocol == "augmented"


def test_reproduce_paper_runs_end_to_end_on_tiny_data(tmp_path: Path) -> None:
    # no val directory: val is held out of train (data.val_fraction), as the spec does with ImageNet
    write_imagefolder(tmp_path / "images", {"train": 30, "test": 8}, classes=2, side=18)
    spec = {
        "output_dir": str(tmp_path / "out"),
        "models": {"vit_small_100ep": str(release_checkpoint(tmp_path / "vit_small_100ep.pth"))},
        "shared": {
            "data": {
                "source": "imagefolder",
                "root": str(tmp_path / "images"),
                "prepared_dir": str(tmp_path / "p"),
            },
            "evaluate": {
                "device": "cpu",
                "num_workers": 0,
                "batch_size": 16,
                "knn_k": [5, 20],
                "linear_epochs": 2,
                "linear_batch_size": 8,
            },
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["reproduce-paper", str(tmp_path / "spec.yaml"), "--no-progress"]) == 0

    model = tmp_path / "out" / "vit_small_100ep"
    linear = json.loads((model / "linear.json").read_text())
    knn = json.loads((model / "knn.json").read_text())
    # the preset's recipe: the augmented probe on the last 4 CLS tokens, the authors' lr and T
    assert linear["protocol"] == "augmented" and linear["n_last_blocks"] == 4 and not linear["avgpool"]
    assert [row["lr"] for row in linear["sweep"]] == [0.015] and linear["feature_dim"] == 4 * 192
    assert knn["temperature"] == 0.05
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| vit_small_100ep | paper (Table 1) | 72.3 | 76.4 | augmented |" in summary
    assert f"| {100 * linear['test']['top1']:.1f} | augmented |" in summary
    # a rerun reads the metrics files instead of evaluating again
    before = (model / "linear.json").stat().st_mtime_ns
    assert main(["reproduce-paper", str(tmp_path / "spec.yaml"), "--no-progress"]) == 0
    assert (model / "linear.json").stat().st_mtime_ns == before
