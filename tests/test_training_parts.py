"""Schedules, parameter groups, gradient handling, teacher EMA and the collapse-watch signals."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mugs import files
from mugs.monitoring import (
    collapse_warnings,
    effective_rank,
    feature_std,
    group_entropy,
    normalised_group_entropy,
)
from mugs.training import checkpoint as ckpt
from mugs.training.ema import ema_update
from mugs.training.optim import (
    apply_schedules,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    parameter_groups,
)
from mugs.training.schedules import cosine_schedule

# ---------------------------------------------------------------- schedules


def test_cosine_schedule_warmup_then_cosine():
    values = cosine_schedule(1.0, 0.0, epochs=3, iters_per_epoch=2, warmup_epochs=1, warmup_start=0.1)
    assert values.dtype == np.float64 and values.shape == (6,)
    # Warmup includes both ends; the cosine over n = 4 iterations is 0.5·(1 + cos(π i / 4)).
    expected = [0.1, 1.0, 1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.5 * (1 - math.sqrt(0.5))]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)


def test_cosine_schedule_without_warmup_and_teacher_momentum():
    lr = cosine_schedule(8e-4, 1e-6, epochs=10, iters_per_epoch=5)
    assert len(lr) == 50
    assert lr[0] == 8e-4
    assert lr[-1] == pytest.approx(1e-6 + 0.5 * (8e-4 - 1e-6) * (1 + math.cos(math.pi * 49 / 50)))
    momentum = cosine_schedule(0.996, 1.0, epochs=4, iters_per_epoch=3)
    assert momentum[0] == 0.996 and momentum[6] == pytest.approx(0.998)
    assert np.all(np.diff(momentum) > 0) and momentum[-1] < 1.0


def test_cosine_schedule_all_warmup_and_invalid():
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 2, 2, warmup_epochs=2), [0, 1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=2, warmup_epochs=3)


# ---------------------------------------------------------------- parameter groups and optimizer


class _PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, kernel_size=2, stride=2)


class _TinyViTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.last_layer_g = nn.Parameter(torch.ones(3, 1))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_parameter_groups_split_decay_and_patch_embedding():
    model = _TinyViTLike()
    groups = {g["name"]: g for g in parameter_groups(model, patch_embed_lr_mult=0.2, weight_decay=0.04)}
    assert set(groups) == {"decay", "no_decay", "decay_patch_embed", "no_decay_patch_embed"}
    assert _ids(groups["decay"]["params"]) == _ids(
        [model.cls_token, model.pos_embed, model.fc.weight, model.last_layer_g]
    )
    assert _ids(groups["no_decay"]["params"]) == _ids([model.norm.weight, model.norm.bias, model.fc.bias])
    assert _ids(groups["decay_patch_embed"]["params"]) == _ids([model.patch_embed.proj.weight])
    assert _ids(groups["no_decay_patch_embed"]["params"]) == _ids([model.patch_embed.proj.bias])
    assert [(g["apply_weight_decay"], g["lr_mult"], g["weight_decay"]) for g in groups.values()] == [
        (True, 1.0, 0.04),
        (True, 0.2, 0.04),
        (False, 1.0, 0.0),
        (False, 0.2, 0.0),
    ]
    assert not any(model.frozen is p for g in groups.values() for p in g["params"])


def test_parameter_groups_omit_empty_groups():
    groups = parameter_groups(nn.Linear(3, 2, bias=False))
    assert [g["name"] for g in groups] == ["decay"]


def test_optimizer_follows_the_schedules():
    model = _TinyViTLike()
    optimizer = build_optimizer(parameter_groups(model), lr=0.0)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)  # fused is CUDA only
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8

    apply_schedules(optimizer, lr=1e-3, weight_decay=0.05)
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert settings["decay"] == (1e-3, 0.05)
    assert settings["no_decay"] == (1e-3, 0.0)
    assert settings["decay_patch_embed"] == (pytest.approx(2e-4), 0.05)
    assert settings["no_decay_patch_embed"] == (pytest.approx(2e-4), 0.0)

    # With zero gradients AdamW changes only the decayed weights: p ← p·(1 − lr·wd).
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before_pos, before_bias = model.pos_embed.detach() + 1.0, model.fc.bias.detach().clone()
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    optimizer.step()
    torch.testing.assert_close(model.pos_embed.detach(), before_pos * (1 - 1e-3 * 0.05))
    torch.testing.assert_close(model.fc.bias.detach(), before_bias)


# ---------------------------------------------------------------- gradient handling


def test_clip_gradients_per_tensor_against_hand_values():
    big = nn.Parameter(torch.zeros(2))
    small = nn.Parameter(torch.zeros(2, 1))
    exact = nn.Parameter(torch.zeros(1))
    no_grad = nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([3.0, 4.0])  # norm 5 → scaled by 2 / (5 + 1e-6)
    small.grad = torch.tensor([[0.6], [0.8]])  # norm 1 → untouched
    exact.grad = torch.tensor([2.0])  # norm 2 = max_norm: factor 2 / (2 + 1e-6) < 1, a hair smaller

    norms = clip_gradients_per_tensor([big, small, no_grad, exact], max_norm=2.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0, 2.0]))
    torch.testing.assert_close(big.grad, torch.tensor([3.0, 4.0]) * 2 / (5 + 1e-6))
    assert big.grad.norm().item() == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(small.grad, torch.tensor([[0.6], [0.8]]), rtol=0, atol=0)
    torch.testing.assert_close(exact.grad, torch.tensor([2.0 * 2 / (2 + 1e-6)]))
    assert no_grad.grad is None


def test_clip_gradients_without_any_gradient():
    assert clip_gradients_per_tensor([nn.Parameter(torch.zeros(2))], 1.0).numel() == 0


class _WithLastLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.last_layer = nn.Linear(2, 2, bias=False)


def test_last_layer_gradients_dropped_while_frozen_and_adamw_skips_it():
    model = _WithLastLayer()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(model, epoch=0, freeze_last_layer=1)
    assert model.last_layer.weight.grad is None
    assert model.body.weight.grad is not None and model.body.bias.grad is not None

    optimizer = build_optimizer(parameter_groups(model), lr=0.1)
    apply_schedules(optimizer, lr=0.1, weight_decay=0.5)
    frozen_before = model.last_layer.weight.detach().clone()
    body_before = model.body.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(model.last_layer.weight.detach(), frozen_before, rtol=0, atol=0)
    assert not torch.equal(model.body.weight.detach(), body_before)

    model.last_layer.weight.grad = torch.ones(2, 2)
    cancel_last_layer_gradients(model, epoch=1, freeze_last_layer=1)
    assert model.last_layer.weight.grad is not None


# ---------------------------------------------------------------- teacher EMA


class _Net(nn.Module):
    def __init__(self, with_predictor: bool):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        if with_predictor:
            self.predictor = nn.Linear(2, 2)


def test_ema_update_moves_teacher_towards_student_only():
    teacher, student = _Net(with_predictor=False), _Net(with_predictor=True)
    for p in teacher.parameters():
        p.data.fill_(1.0)
        p.requires_grad_(False)
    for p in student.parameters():
        p.data.fill_(3.0)
    student.bn.running_mean.fill_(7.0)

    ema_update(teacher, student, momentum=0.75)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.75 * 1.0 + 0.25 * 3.0), msg=name)
    torch.testing.assert_close(teacher.bn.running_mean, torch.zeros(2))  # buffers are not averaged
    torch.testing.assert_close(student.proj.weight.detach(), torch.full((2, 2), 3.0))

    ema_update(teacher, student, momentum=1.0)
    torch.testing.assert_close(teacher.proj.weight, torch.full((2, 2), 1.5))


def test_ema_update_names_a_missing_student_parameter():
    with pytest.raises(KeyError, match=r"predictor\.weight"):
        ema_update(_Net(with_predictor=True), _Net(with_predictor=False), momentum=0.9)


# ---------------------------------------------------------------- collapse watch


def test_feature_std_collapsed_hand_and_random():
    collapsed = torch.tensor([[1.0, 2.0, 2.0]]) * torch.tensor([[1.0], [2.0], [5.0]])  # same direction
    assert feature_std(collapsed) == pytest.approx(0.0, abs=1e-7)
    # Normalised rows (1, 0) and (0, 1): each dimension holds {1, 0}, population std 0.5.
    assert feature_std(torch.tensor([[2.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.5)
    torch.manual_seed(0)
    assert feature_std(torch.randn(4096, 64)) == pytest.approx(1 / math.sqrt(64), rel=0.05)


def test_group_entropy_one_prototype_two_prototypes_uniform():
    one = F.one_hot(torch.zeros(6, dtype=torch.long), 8).float()
    assert group_entropy(one) == pytest.approx(0.0, abs=1e-7)
    two = F.one_hot(torch.tensor([0, 1, 0, 1]), 8).float()
    assert group_entropy(two) == pytest.approx(math.log(2))
    assert normalised_group_entropy(two) == pytest.approx(math.log(2) / math.log(8))
    uniform = torch.full((3, 8), 1 / 8)
    assert normalised_group_entropy(uniform) == pytest.approx(1.0)


def test_effective_rank_hand_values():
    assert effective_rank(torch.ones(5, 3)) == pytest.approx(1.0, rel=1e-5)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0, rel=1e-5)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(
        math.exp(-(p * p.log()).sum().item()), rel=1e-5
    )
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_collapse_warnings_on_collapsed_and_healthy_batches():
    torch.manual_seed(0)
    dim, batch, out_dim = 32, 64, 16
    healthy = torch.randn(batch, dim)
    healthy_probs = F.softmax(torch.randn(batch, out_dim) * 3, dim=-1)
    assert (
        collapse_warnings(
            feature_std(healthy),
            normalised_group_entropy(healthy_probs),
            effective_rank(healthy),
            dim=dim,
            n_samples=batch,
        )
        == []
    )

    collapsed = torch.randn(1, dim).expand(batch, dim) + 1e-6 * torch.randn(batch, dim)
    collapsed_probs = F.one_hot(torch.full((batch,), 3), out_dim).float()
    warnings = collapse_warnings(
        feature_std(collapsed),
        normalised_group_entropy(collapsed_probs),
        effective_rank(collapsed),
        dim=dim,
        n_samples=batch,
    )
    assert len(warnings) == 3
    assert "feature std" in warnings[0] and "group entropy" in warnings[1] and "effective rank" in warnings[2]

    assert collapse_warnings(None, None, None, dim=dim) == []
    # A batch of 8 can reach rank 8 at most: rank 1.2 warns, rank 3 does not (threshold max(1.5, 0.4)).
    assert len(collapse_warnings(None, None, 1.2, dim=256, n_samples=8)) == 1
    assert collapse_warnings(None, None, 3.0, dim=256, n_samples=8) == []


def test_publish_link_hard_links_else_copies_and_leaves_no_temporary(tmp_path, monkeypatch):
    source = tmp_path / "latest.pt"
    source.write_bytes(b"weights")
    linked = files.publish_link(source, tmp_path / "epoch0001.pt")
    assert linked.read_bytes() == b"weights" and linked.stat().st_ino == source.stat().st_ino

    def no_hard_links(*args, **kwargs):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_hard_links)
    (tmp_path / "selected.pt").write_bytes(b"an older choice")
    copied = files.publish_link(source, tmp_path / "selected.pt")
    assert copied.read_bytes() == b"weights" and copied.stat().st_ino != source.stat().st_ino
    assert not list(tmp_path.glob(".*.tmp"))


def test_backbone_state_strips_the_prefix_and_leaves_out_the_relation_block_on_request():
    pos_embed, relation, head = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    payload = {
        "teacher": {"backbone.pos_embed": pos_embed, "backbone.relation_blocks.0.w": relation, "head.w": head}
    }
    state = ckpt.backbone_state(payload, "teacher")
    assert state.keys() == {"pos_embed", "relation_blocks.0.w"} and state["pos_embed"] is pos_embed
    assert ckpt.backbone_state(payload, "teacher", relation_block=False).keys() == {"pos_embed"}
    with pytest.raises(ValueError, match=r"^run\.pt has no 'student' network \(keys: teacher\)$"):
        ckpt.backbone_state(payload, "student", source="run.pt")
    with pytest.raises(ValueError, match=r"^run\.pt: its 'teacher' network holds no backbone"):
        ckpt.backbone_state({"teacher": {"head.w": head}}, "teacher", source="run.pt")
