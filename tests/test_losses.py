"""The Mugs losses against hand-written loop references on tiny tensors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mugs.config import config_from_dict
from mugs.losses import GroupLoss, InfoNCEQueueLoss, MugsObjective
from mugs.model import NetworkOutput


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _combine(global_terms: list[float], local_terms: list[float]) -> float:
    global_mean = sum(global_terms) / len(global_terms)
    if not local_terms:
        return global_mean
    return 0.5 * (global_mean + sum(local_terms) / len(local_terms))


def infonce_reference(student, teacher, queue, n_crops: int, tau: float) -> float:
    """Explicit loops over teacher crop, student crop, image and queue column."""
    student, teacher, queue = student.tolist(), teacher.tolist(), queue.T.tolist()
    batch = len(teacher) // 2
    global_terms, local_terms = [], []
    for t in range(2):
        for p in range(n_crops):
            if p == t:
                continue
            total = 0.0
            for b in range(batch):
                s = student[p * batch + b]
                logits = [_dot(s, teacher[t * batch + b]) / tau] + [_dot(s, k) / tau for k in queue]
                total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
            (global_terms if p < 2 else local_terms).append(total / batch)
    return _combine(global_terms, local_terms)


def group_reference(student, teacher, center, n_crops: int, teacher_temp: float, student_temp: float):
    """Explicit loops; returns the loss and the updated centre."""
    student, teacher, center = student.tolist(), teacher.tolist(), center[0].tolist()
    batch, out = len(teacher) // 2, len(center)

    def softmax(row: list[float], temp: float) -> list[float]:
        exps = [math.exp(v / temp) for v in row]
        return [e / sum(exps) for e in exps]

    global_terms, local_terms = [], []
    for t in range(2):
        for p in range(n_crops):
            if p == t:
                continue
            total = 0.0
            for b in range(batch):
                q = softmax(
                    [y - c for y, c in zip(teacher[t * batch + b], center, strict=True)], teacher_temp
                )
                s = softmax(student[p * batch + b], student_temp)
                total += -sum(q[k] * math.log(s[k]) for k in range(out))
            (global_terms if p < 2 else local_terms).append(total / batch)
    batch_mean = [sum(row[k] for row in teacher) / len(teacher) for k in range(out)]
    new_center = [0.9 * c + 0.1 * m for c, m in zip(center, batch_mean, strict=True)]
    return _combine(global_terms, local_terms), new_center


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.mark.parametrize("n_crops", [2, 3, 4])
def test_infonce_matches_loop_reference(n_crops):
    torch.manual_seed(0)
    batch, dim, queue_size, tau = 3, 4, 7, 0.2
    loss_fn = InfoNCEQueueLoss(dim=dim, queue_size=queue_size, temperature=tau, n_crops=n_crops)
    student, teacher = _unit(n_crops * batch, dim), _unit(2 * batch, dim)
    expected = infonce_reference(student, teacher, loss_fn.queue.clone(), n_crops, tau)
    assert loss_fn(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_infonce_averages_global_and_local_separately():
    # Targets and global student crops are e1, local student crops e2, the only queue column e2: every
    # global pair has loss log(1 + e^(-1/τ)) and every local pair log(1 + e^(1/τ)). With 4 crops there
    # are 2 global and 4 local pairs, so a plain mean over all pairs would weigh them 1:2.
    tau, batch = 0.5, 2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss_fn = InfoNCEQueueLoss(dim=2, queue_size=1, temperature=tau, n_crops=4)
    loss_fn.queue.copy_(e2[:, None])
    student = torch.stack([e1] * (2 * batch) + [e2] * (2 * batch))
    teacher = torch.stack([e1] * (2 * batch))
    global_pair, local_pair = math.log1p(math.exp(-1 / tau)), math.log1p(math.exp(1 / tau))
    assert loss_fn(student, teacher).item() == pytest.approx(0.5 * (global_pair + local_pair), rel=1e-6)

    two_crops = InfoNCEQueueLoss(dim=2, queue_size=1, temperature=tau, n_crops=2)
    two_crops.queue.copy_(e2[:, None])
    assert two_crops(student[: 2 * batch], teacher).item() == pytest.approx(global_pair, rel=1e-6)


def test_infonce_negatives_come_from_the_queue_before_this_step():
    torch.manual_seed(1)
    batch, dim, queue_size, tau = 2, 3, 5, 0.2
    loss_fn = InfoNCEQueueLoss(dim=dim, queue_size=queue_size, temperature=tau, n_crops=3)
    student, teacher = _unit(3 * batch, dim), _unit(2 * batch, dim)
    before = loss_fn.queue.clone()
    # The queue a wrong implementation would use for teacher crop 1: crop 0's targets already enqueued.
    after_crop0 = before.clone()
    after_crop0[:, :batch] = teacher[:batch].T

    loss = loss_fn(student, teacher).item()
    assert loss == pytest.approx(infonce_reference(student, teacher, before, 3, tau), rel=1e-5)
    assert loss != pytest.approx(infonce_reference(student, teacher, after_crop0, 3, tau), rel=1e-3)


def test_infonce_gradient_reaches_student_only():
    torch.manual_seed(2)
    loss_fn = InfoNCEQueueLoss(dim=4, queue_size=6, n_crops=3)
    student = _unit(6, 4).requires_grad_()
    teacher = _unit(4, 4).requires_grad_()
    loss_fn(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_infonce_queue_initialised_unit_columns():
    loss_fn = InfoNCEQueueLoss(dim=8, queue_size=16, n_crops=4)
    assert loss_fn.queue.shape == (8, 16)
    torch.testing.assert_close(loss_fn.queue.norm(dim=0), torch.ones(16))
    assert loss_fn.queue_pointer.dtype == torch.int64 and loss_fn.queue_pointer.tolist() == [0]


def test_infonce_enqueue_writes_teacher_crops_in_order_and_wraps():
    batch, dim, queue_size = 2, 3, 5
    loss_fn = InfoNCEQueueLoss(dim=dim, queue_size=queue_size, n_crops=2)
    initial = loss_fn.queue.clone()
    first, second = _unit(2 * batch, dim), _unit(2 * batch, dim)

    loss_fn(_unit(2 * batch, dim), first)
    assert loss_fn.queue_pointer.tolist() == [4]
    torch.testing.assert_close(loss_fn.queue[:, :4], first.T)  # crop 0 → columns 0, 1; crop 1 → 2, 3
    torch.testing.assert_close(loss_fn.queue[:, 4], initial[:, 4])

    loss_fn(_unit(2 * batch, dim), second)
    # Crop 0 crosses the end: rows go to columns 4 and 0; crop 1 to columns 1 and 2; column 3 keeps
    # the first step's last row.
    assert loss_fn.queue_pointer.tolist() == [3]
    torch.testing.assert_close(loss_fn.queue[:, 4], second[0])
    torch.testing.assert_close(loss_fn.queue[:, 0], second[1])
    torch.testing.assert_close(loss_fn.queue[:, 1:3], second[2:].T)
    torch.testing.assert_close(loss_fn.queue[:, 3], first[3])


def test_infonce_enqueue_more_keys_than_queue_keeps_the_last_ones():
    loss_fn = InfoNCEQueueLoss(dim=2, queue_size=3, n_crops=2)
    keys = torch.arange(8, dtype=torch.float32).view(4, 2)
    loss_fn._enqueue(keys)
    # Written one by one from column 0: columns 0, 1, 2, 0 → key 3 overwrites key 0.
    torch.testing.assert_close(loss_fn.queue.T, keys[[3, 1, 2]])
    assert loss_fn.queue_pointer.tolist() == [1]


def test_infonce_rejects_mismatched_batches():
    loss_fn = InfoNCEQueueLoss(dim=2, queue_size=3, n_crops=3)
    with pytest.raises(ValueError, match="images per crop"):
        loss_fn(torch.zeros(6, 2), torch.zeros(6, 2))


def test_teacher_temperature_schedule_follows_the_official_per_epoch_table():
    loss_fn = GroupLoss(
        8, n_crops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, epochs=100
    )
    table = np.concatenate((np.linspace(0.04, 0.07, 30), np.full(70, 0.07)))
    for epoch in (0, 1, 15, 29, 30, 99):
        assert loss_fn.teacher_temperature(epoch) == pytest.approx(table[epoch], abs=1e-12)
    assert loss_fn.teacher_temperature(0) == 0.04
    assert loss_fn.teacher_temperature(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert loss_fn.teacher_temperature(150) == 0.07  # past the planned epochs: stays constant

    one_epoch = GroupLoss(
        8, n_crops=2, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=1, epochs=3
    )
    assert [one_epoch.teacher_temperature(e) for e in range(3)] == [0.02, 0.05, 0.05]
    no_warmup = GroupLoss(8, n_crops=2, warmup_teacher_temp=0.02, teacher_temp=0.05, epochs=3)
    assert no_warmup.teacher_temperature(0) == 0.05


@pytest.mark.parametrize("n_crops", [2, 3, 4])
def test_group_loss_matches_loop_reference_with_centering(n_crops):
    torch.manual_seed(3)
    batch, out = 3, 5
    loss_fn = GroupLoss(
        out,
        n_crops=n_crops,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=5,
        epochs=10,
    )
    loss_fn.center.copy_(torch.randn(1, out))
    student, teacher = torch.randn(n_crops * batch, out), torch.randn(2 * batch, out)
    epoch = 2
    temp = 0.04 + 0.03 * 2 / 4
    expected_loss, expected_center = group_reference(
        student, teacher, loss_fn.center.clone(), n_crops, temp, 0.1
    )

    loss = loss_fn(student, teacher, epoch)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(loss_fn.center, torch.tensor([expected_center]))


def test_group_loss_uses_the_centre_before_its_update():
    torch.manual_seed(4)
    # A soft teacher (τₜ = 1) so that the centre shift visibly changes its distribution.
    loss_fn = GroupLoss(4, n_crops=3, warmup_teacher_temp=1.0, teacher_temp=1.0, epochs=1)
    student, teacher = torch.randn(6, 4), 3 * torch.randn(4, 4)
    expected, _ = group_reference(student, teacher, torch.zeros(1, 4), 3, 1.0, 0.1)
    assert loss_fn(student, teacher, 0).item() == pytest.approx(expected, rel=1e-5)
    # The same inputs again are now centred with the updated centre, so the loss changes.
    expected_second, _ = group_reference(student, teacher, loss_fn.center.clone(), 3, 1.0, 0.1)
    second = loss_fn(student, teacher, 0).item()
    assert second == pytest.approx(expected_second, rel=1e-5)
    assert second != pytest.approx(expected, rel=1e-3)


def test_group_loss_gradient_reaches_student_only():
    torch.manual_seed(5)
    loss_fn = GroupLoss(4, n_crops=3, epochs=1)
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(4, 4, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_group_teacher_probabilities_are_centred_and_sharpened():
    loss_fn = GroupLoss(2, n_crops=2, teacher_temp=0.5, epochs=1)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0]]))
    probs = loss_fn.teacher_probabilities(torch.tensor([[1.0, 0.5]]), 0)
    # (1 − 1, 0.5 − 0) / 0.5 = (0, 1) → softmax = (1, e) / (1 + e)
    torch.testing.assert_close(probs, torch.tensor([[1.0, math.e]]) / (1 + math.e))


def test_losses_stay_float32_under_bf16_autocast():
    torch.manual_seed(6)
    info = InfoNCEQueueLoss(dim=4, queue_size=8, n_crops=3)
    group = GroupLoss(6, n_crops=3, epochs=1)
    queue = info.queue.clone()
    student, teacher = _unit(6, 4).bfloat16(), _unit(4, 4).bfloat16()
    logits_s, logits_t = torch.randn(6, 6).bfloat16(), torch.randn(4, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        info_loss, group_loss = info(student, teacher), group(logits_s, logits_t, 0)
    assert info_loss.dtype == group_loss.dtype == torch.float32
    # A bf16 result would carry only ~3 significant digits.
    assert info_loss.item() == pytest.approx(
        infonce_reference(student.float(), teacher.float(), queue, 3, 0.2), rel=1e-5
    )
    expected, _ = group_reference(logits_s.float(), logits_t.float(), torch.zeros(1, 6), 3, 0.04, 0.1)
    assert group_loss.item() == pytest.approx(expected, rel=1e-5)


def _outputs(rows: int, generator: torch.Generator) -> NetworkOutput:
    """Instance and group outputs of ``rows`` crop rows, in bf16 as an autocast forward gives them."""
    return NetworkOutput(
        instance=F.normalize(torch.randn(rows, 4, generator=generator), dim=-1).bfloat16(),
        local_group=None,
        group=torch.randn(rows, 6, generator=generator).bfloat16(),
        cls=torch.randn(rows, 8, generator=generator),
        memory_feature=torch.randn(rows, 8, generator=generator),
    )


def test_objective_weights_the_enabled_losses_in_fp32_and_gives_the_group_loss_its_epoch():
    config = config_from_dict(
        {
            "augment": {"n_local": 1},
            "model": {"out_dim": 4, "group_out_dim": 6},
            "optim": {"epochs": 3, "warmup_epochs": 1},
            "loss": {
                "instance_weight": 1.0,
                "local_group_weight": 0.0,
                "group_weight": 3.0,
                "instance_queue_size": 8,
                "group_warmup_teacher_temp": 0.04,
                "group_teacher_temp": 0.07,
                "group_warmup_teacher_temp_epochs": 2,
            },
        }
    )
    torch.manual_seed(0)
    objective = MugsObjective.from_config(config)
    assert list(objective.losses) == ["instance", "group"]
    assert objective.group_loss is objective.losses["group"]
    instance_loss, group_loss = (copy.deepcopy(objective.losses[name]) for name in ("instance", "group"))
    generator = torch.Generator().manual_seed(1)
    student, teacher = _outputs(3 * 2, generator), _outputs(2 * 2, generator)

    total, losses = objective(student, teacher, epoch=1)

    # epoch 1 of a 2-epoch warm-up: the group loss's teacher temperature is 0.07, not epoch 0's 0.04
    instance = instance_loss(student.instance.float(), teacher.instance.float())
    group = group_loss(student.group.float(), teacher.group.float(), 1)
    assert losses.keys() == {"instance", "group"}
    assert torch.equal(losses["instance"], instance) and torch.equal(losses["group"], group)
    assert total.dtype == torch.float32 and torch.equal(total, (1.0 * instance + 3.0 * group) / 4.0)
    # the losses updated their queue and centre as the step does
    assert torch.equal(objective.losses["instance"].queue, instance_loss.queue)
    assert torch.equal(objective.losses["group"].center, group_loss.center)
