"""Linear-probe sweep: each head trains exactly as alone, and the reported head is chosen on val."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mugs.evaluation.features import FeatureSet
from mugs.evaluation.heads import SweepSettings, head_logits, init_heads
from mugs.evaluation.linear import linear_evaluate, train_linear_probes


def blobs(per_class: int, seed: int, classes: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = 4.0 * torch.eye(dim)[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def feature_set(features: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
    return FeatureSet(features, labels, labels // 2, list("abcd"), ["ab", "cd"])


def test_init_heads_is_seeded_normal_001_and_zero_bias() -> None:
    weight, bias = init_heads(3, 200, 50, seed=1)
    assert weight.shape == (3, 200, 50) and bias.shape == (3, 50)
    assert weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(bias) == 0
    assert torch.equal(weight, init_heads(3, 200, 50, seed=1)[0])
    assert not torch.equal(weight, init_heads(3, 200, 50, seed=2)[0])


def test_every_head_follows_torch_sgd_with_its_own_lr_and_wd() -> None:
    features, labels = blobs(10, seed=0)
    lrs, wds, batch, seed = [40.0, 4.0], [0.0, 0.05], 8, 3
    sweep = train_linear_probes(
        features,
        labels,
        features,
        labels,
        num_classes=4,
        lrs=lrs,
        weight_decays=wds,
        epochs=1,  # the only epoch is the best one, so the kept weights are the final ones
        batch_size=batch,
        seed=seed,
    )
    initial_weight, initial_bias = init_heads(4, 8, 4, seed=seed)
    steps = math.ceil(len(labels) / batch)
    for head, (lr, wd) in enumerate((lr, wd) for lr in lrs for wd in wds):
        weight = torch.nn.Parameter(initial_weight[head].clone())
        bias = torch.nn.Parameter(initial_bias[head].clone())
        optimizer = torch.optim.SGD([weight, bias], lr=0.0, momentum=0.9, weight_decay=wd)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        for step, start in enumerate(range(0, len(labels), batch)):
            index = order[start : start + batch]
            optimizer.param_groups[0]["lr"] = lr * batch / 256 * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            F.cross_entropy(features[index] @ weight + bias, labels[index]).backward()
            optimizer.step()
        assert torch.allclose(sweep.weight[head], weight.detach(), atol=1e-6), (lr, wd)
        assert torch.allclose(sweep.bias[head], bias.detach(), atol=1e-6), (lr, wd)
        assert not torch.allclose(sweep.weight[head], initial_weight[head])


def test_the_reported_head_is_the_best_on_val_not_on_test() -> None:
    train_x, train_y = blobs(30, seed=0)
    val_x, true_val_y = blobs(15, seed=1)
    test_x, test_y = blobs(15, seed=2)
    # Head 0 has lr 0, so it keeps its initial weights; label val with its own predictions, so it is
    # perfect on val while the trained head 1 is the better one on test.
    weight, bias = init_heads(2, 8, 4, seed=0)
    val_y = head_logits(weight, bias, val_x)[0].argmax(dim=1)
    assert not torch.equal(val_y, true_val_y)
    lrs, epochs, batch = [0.0, 10.0], 5, 16

    sweep = train_linear_probes(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes=4,
        lrs=lrs,
        weight_decays=[0.0],
        epochs=epochs,
        batch_size=batch,
    )
    test_top1 = (head_logits(sweep.weight, sweep.bias, test_x).argmax(dim=2) == test_y).double().mean(dim=1)
    assert sweep.best_val_top1[0] == 1.0 and sweep.best_head == 0
    assert test_top1[1] >= 0.95 > test_top1[0]  # on test, the trained head would win

    result = linear_evaluate(
        feature_set(train_x, train_y),
        feature_set(val_x, val_y),
        feature_set(test_x, test_y),
        SweepSettings(lrs, [0.0], epochs, batch),
    )
    assert result["selected"] == {"lr": 0.0, "weight_decay": 0.0, "epoch": 1, "val_top1": 1.0}
    predicted = head_logits(weight, bias, test_x)[0].argmax(dim=1)
    assert result["test"]["top1"] == pytest.approx(float((predicted == test_y).double().mean()))
    # coarse accuracy is the fine prediction mapped to its coarse class (class // 2 here)
    assert result["test"]["coarse_top1"] == pytest.approx(
        float((predicted // 2 == test_y // 2).double().mean())
    )
    assert [row["lr"] for row in result["sweep"]] == lrs
    assert result["sweep"][1]["best_val_top1"] < 1.0


def test_probes_learn_separable_data_and_keep_the_best_epoch() -> None:
    train_x, train_y = blobs(30, seed=0)
    val_x, val_y = blobs(15, seed=1)
    sweep = train_linear_probes(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes=4,
        lrs=[1e-3, 10.0],
        weight_decays=[0.0, 1e-3],
        epochs=4,
        batch_size=16,
    )
    assert len(sweep.lrs) == 4 and sweep.weight.shape == (4, 8, 4)
    assert sweep.best_val_top1[2:].min() >= 0.95
    assert sweep.best_head in (2, 3)
    assert ((sweep.best_epoch >= 1) & (sweep.best_epoch <= 4)).all()
    kept = head_logits(sweep.weight, sweep.bias, val_x).argmax(dim=2) == val_y
    assert torch.equal(kept.double().mean(dim=1), sweep.best_val_top1)
