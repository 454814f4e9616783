"""Fine-tuning: layer-decay parameter groups, the accuracy counts, and a tiny end-to-end run."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from mugs.cli import main
from mugs.config import ConfigError, FinetuneConfig, config_from_dict
from mugs.evaluation.finetune import (
    build_finetune_model,
    evaluate_classifier,
    layer_decay_groups,
    layer_id,
    run_finetune,
    train_transform,
)
from mugs.model.backbone import VIT_SIZES, MugsViT, create_backbone
from mugs.testing.finetuning import prepare_tiny_split
from mugs.training.checkpoint import FORMAT, atomic_save


def tiny_vit(depth: int = 2, classes: int = 3) -> MugsViT:
    model = MugsViT(img_size=8, patch_size=4, embed_dim=8, depth=depth, num_heads=2, relation_block=False)
    model.reset_classifier(classes)
    return model


def test_layer_id_of_stem_blocks_and_head():
    assert [layer_id(n, 2) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight")] == [0, 0, 0]
    assert layer_id("blocks.0.attn.qkv.weight", 2) == 1
    assert layer_id("blocks.1.mlp.fc2.bias", 2) == 2
    assert [layer_id(n, 2) for n in ("norm.weight", "fc_norm.bias", "head.weight")] == [3, 3, 3]
    # block 10 must not be read as block 1
    assert layer_id("blocks.10.norm1.weight", 12) == 11


def test_layer_decay_groups_for_a_two_block_model():
    model = tiny_vit(depth=2)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    # every trainable parameter exactly once
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # scale = 0.5 ** (depth + 1 - id) with depth 2: stem 1/8, block 0 1/4, block 1 1/2, head 1
    expected = {
        "patch_embed.proj.weight": (0.125, 0.05),
        "patch_embed.proj.bias": (0.125, 0.0),
        "cls_token": (0.125, 0.0),
        "pos_embed": (0.125, 0.0),
        "blocks.0.attn.qkv.weight": (0.25, 0.05),
        "blocks.0.norm1.weight": (0.25, 0.0),
        "blocks.1.mlp.fc1.weight": (0.5, 0.05),
        "blocks.1.mlp.fc1.bias": (0.5, 0.0),
        "norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, (scale, decay) in expected.items():
        assert by_name[name]["lr_mult"] == pytest.approx(scale), name
        assert by_name[name]["weight_decay"] == decay, name
    # (layer id, decayed) pairs: 4 ids × {decay, no decay}
    assert [(g["layer_id"], g["weight_decay"] > 0) for g in groups] == [
        (i, d) for i in range(4) for d in (True, False)
    ]


def test_build_finetune_model_loads_the_backbone_and_drops_the_relation_block(monkeypatch):
    monkeypatch.setitem(VIT_SIZES, "vit_tiny", (16, 4, 2))
    source = create_backbone("vit_tiny", patch_size=4, img_size=8, relation_block=True)
    model = build_finetune_model(
        source.state_dict(), arch="vit_tiny", patch_size=4, img_size=8, num_classes=5, drop_path_rate=0.1
    )
    assert model.relation_blocks is None
    assert torch.equal(model.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert model.head.weight.shape == (5, 16) and model.head.weight.abs().max() < 1e-4
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_train_transform_survives_zero_bit_posterize():
    # with this magnitude noise timm's own RandAugment asks Pillow for 0-bit posterize, which raises
    tune = FinetuneConfig(rand_augment="rand-n6-m10-mstd3-inc1", erasing_prob=1.0)
    transform = train_transform(8, tune, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = Image.new("RGB", (8, 8), (100, 120, 140))
    outputs = []
    for seed in range(200):
        random.seed(seed)
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert all(o.shape == (3, 8, 8) and torch.isfinite(o).all() for o in outputs)
    random.seed(7)
    torch.manual_seed(7)
    assert torch.equal(transform(image), outputs[7]), "seeded through random and torch"


class _Fixed(nn.Module):
    """Returns preset logits for the image whose single pixel holds its index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten(1)[:, 0].long()]


class _Split(torch.utils.data.Dataset):
    def __init__(self, labels, coarse_labels, classes):
        self.labels, self.coarse_labels, self.classes = np.array(labels), np.array(coarse_labels), classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return torch.full((1, 1, 1), float(index)), int(self.labels[index])


def test_evaluate_classifier_counts_fine_top1_top5_and_coarse_of_the_prediction():
    # 6 classes; coarse: {0,1,2} -> 0, {3,4,5} -> 1
    classes = [str(c) for c in range(6)]
    labels = [0, 1, 3, 5]
    coarse = [0, 0, 1, 1]
    logits = torch.tensor(
        [
            [9, 8, 7, 6, 5, 0.0],  # label 0: top-1 right
            [9, 1, 0, 0, 0, 0.0],  # label 1: top-1 wrong (0, same coarse), in top-5
            [0, 0, 0, 1, 9, 0.0],  # label 3: top-1 wrong (4, same coarse), in top-5
            [9, 8, 7, 6, 5, 0.0],  # label 5: ranked last: not in top-5, coarse wrong
        ]
    )
    # the class -> coarse map is read from the labels, so every class must appear once
    split = _Split([*labels, 2, 4], [*coarse, 0, 1], classes)
    extra = torch.tensor([[0, 0, 9, 0, 0, 0.0], [0, 0, 0, 0, 1, 9.0]])  # 2 right; 4 predicted as 5
    result = evaluate_classifier(_Fixed(torch.cat([logits, extra])), split, batch_size=4)
    assert result["count"] == 6
    assert result["fine"]["top1"] == pytest.approx(2 / 6)  # rows 0 and 4
    assert result["fine"]["top5"] == pytest.approx(5 / 6)  # all but row 3
    assert result["coarse"]["top1"] == pytest.approx(5 / 6)  # all but row 3


def _prepared(tmp_path: Path) -> Path:
    return prepare_tiny_split(tmp_path)


def test_tiny_finetune_run_writes_metrics_of_the_best_validation_epoch(tmp_path, monkeypatch):
    # a 2-block, 16-wide "vit_tiny" keeps the run to seconds on a CPU
    monkeypatch.setitem(VIT_SIZES, "vit_tiny", (16, 2, 2))
    prepared = _prepared(tmp_path)
    config = config_from_dict(
        {
            "model": {"arch": "vit_tiny", "patch_size": 4},
            "augment": {"global_size": 8, "local_size": 4},
            "data": {"source": "imagefolder", "prepared_dir": str(prepared)},
            "train": {"num_workers": 0, "device": "cpu"},
            "finetune": {"epochs": 3, "batch_size": 8, "warmup_epochs": 1, "lr": 1e-2},
        }
    )
    backbone = create_backbone("vit_tiny", patch_size=4, img_size=8, relation_block=True)
    checkpoint = atomic_save(
        {
            "format": FORMAT,
            "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "config": config.to_dict(),
        },
        tmp_path / "ckpt.pt",
    )
    out = tmp_path / "eval" / "finetune.json"
    result = run_finetune(checkpoint, config, out, progress=False)
    assert (result.status, result.global_iteration) == ("finished", 6)
    written = json.loads(out.read_text())
    assert written["provenance"]["checkpoint"] == str(checkpoint)
    assert written["evaluation"] == "finetune"
    # the command line gives the same numbers (same seed, CPU is deterministic)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    again = tmp_path / "cli" / "finetune.json"
    assert main(["finetune", str(checkpoint), "--out", str(again), "-c", str(tmp_path / "config.yaml")]) == 0
    assert json.loads(again.read_text())["history"] == written["history"]
    assert "seconds" in written["timing"]
    history = written["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    val = [h["val_top1"] for h in history]
    assert written["best_epoch"] == 1 + val.index(max(val))
    assert written["val"]["fine"]["top1"] == max(val)
    assert written["test_count"] == 12
    # accuracies are multiples of 1/12, and a right fine class implies a right coarse class
    for key in ("top1", "top5"):
        assert written["fine"][key] * 12 == pytest.approx(round(written["fine"][key] * 12))
    assert written["coarse"]["top1"] >= written["fine"]["top1"]
    assert written["fine"]["top5"] == 1.0  # 4 classes: the top 5 hold every class


def test_the_recorded_config_is_read_validated_and_an_invalid_one_names_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(VIT_SIZES, "vit_tiny", (16, 2, 2))
    config = config_from_dict(
        {
            "model": {"arch": "vit_tiny", "patch_size": 4},
            "augment": {"global_size": 8, "local_size": 4},
            "data": {"source": "imagefolder", "prepared_dir": str(_prepared(tmp_path))},
            "train": {"num_workers": 0, "device": "cpu"},
            "finetune": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0},
        }
    )
    recorded = config.to_dict()
    recorded["model"]["patch_sise"] = 4  # a misspelt key: not a config this package wrote
    backbone = create_backbone("vit_tiny", patch_size=4, img_size=8, relation_block=True)
    checkpoint = atomic_save(
        {
            "format": FORMAT,
            "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "config": recorded,
        },
        tmp_path / "ckpt.pt",
    )
    out = tmp_path / "eval" / "finetune.json"
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(checkpoint))}: its recorded config is invalid.*patch_sise"
    ):
        run_finetune(checkpoint, config, out, progress=False)
    assert not out.exists()
