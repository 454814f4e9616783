"""The two Mugs loss families, InfoNCE against a queue of negatives and the DINO-like group loss, and
:class:`MugsObjective`, their weighted mean over the enabled supervisions.

Both take the student outputs of all ``C = 2 + L`` crops (2 global crops first, then L local ones)
and the teacher outputs of the 2 global crops, each stacked crop-major along dim 0. A student crop is
never compared with the teacher crop it shares an image view with (``p == t``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mugs.config import Config
from mugs.distributed import all_gather_cat, all_reduce_mean
from mugs.ring_buffer import ring_write

if TYPE_CHECKING:
    from mugs.model import NetworkOutput


def _average_pairs(pair_losses: Tensor, n_crops: int) -> Tensor:
    """0.5·(mean over global pairs + mean over local pairs) of a [2, n_crops] table of pair losses.

    The pairs are picked by fixed positions, not a boolean mask, whose data-dependent result size would
    cost a host synchronisation on a GPU. Without local crops the global mean alone is the loss (the
    public code divides by zero there).
    """
    # (teacher 0, student 1) and (teacher 1, student 0); every local student crop pairs with both teachers
    global_mean = torch.stack((pair_losses[0, 1], pair_losses[1, 0])).mean()
    if n_crops == 2:
        return global_mean
    return 0.5 * (global_mean + pair_losses[:, 2:].reshape(-1).mean())


def _full_precision(reference: Tensor) -> torch.autocast:
    """Disable autocast: under bf16/fp16 the contractions below would round the loss to ~3 digits."""
    return torch.autocast(reference.device.type, enabled=False)


def _check_crops(n_crops: int, student: Tensor, teacher: Tensor) -> int:
    if student.shape[0] % n_crops or teacher.shape[0] % 2:
        raise ValueError(
            f"expected student rows divisible by n_crops={n_crops} and teacher rows by 2, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    batch = student.shape[0] // n_crops
    if teacher.shape[0] != 2 * batch:
        raise ValueError(f"student has {batch} images per crop but teacher has {teacher.shape[0] // 2}")
    return batch


class InfoNCEQueueLoss(nn.Module):
    """InfoNCE between student predictions and teacher targets, with negatives from a queue of targets.

    With ``s`` the student prediction of crop p, ``t`` the teacher target of global crop t (same image),
    ``Q`` the queue [dim, K] as it was before this step and τ the temperature, each pair (t, p ≠ t) gives

        ℓ(t, p) = mean over images of  −log( exp(s·t/τ) / (exp(s·t/τ) + Σ_k exp(s·Q_k/τ)) )

    i.e. cross-entropy of the logits ``[s·t, s·Q] / τ`` with label 0. The loss is
    ``0.5·(mean_{p<2} ℓ + mean_{p≥2} ℓ)`` (global and local student crops averaged separately), or the
    global mean alone when there are no local crops. Afterwards the teacher targets of crop 0, then of
    crop 1, are gathered over ranks and written into the ring-buffer queue.

    Inputs are expected L2-normalised already (the heads do it); the loss does not normalise.
    """

    queue: Tensor
    queue_pointer: Tensor

    def __init__(self, dim: int = 256, queue_size: int = 65536, temperature: float = 0.2, n_crops: int = 12):
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"n_crops must count the 2 global crops at least, got {n_crops}")
        self.dim = dim
        self.queue_size = queue_size
        self.temperature = temperature
        self.n_crops = n_crops
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_pointer", torch.zeros(1, dtype=torch.long))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        batch = _check_crops(self.n_crops, student, teacher)
        targets = teacher.detach().float().view(2, batch, -1)
        negatives = self.queue.detach().clone()
        with _full_precision(student):
            preds = student.float().view(self.n_crops, batch, -1)
            # s·Q does not depend on the teacher crop, so its log-sum-exp is computed once per student
            # crop and merged with each positive: logsumexp([a, b...]) = logaddexp(a, logsumexp(b...)).
            negative_lse = torch.logsumexp((preds @ negatives) / self.temperature, dim=-1)
            positive = torch.einsum("tbd,pbd->tpb", targets, preds) / self.temperature
            pair_losses = (torch.logaddexp(positive, negative_lse.unsqueeze(0)) - positive).mean(dim=-1)
            loss = _average_pairs(pair_losses, self.n_crops)

        for crop_targets in targets:
            self._enqueue(crop_targets)
        return loss

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write the keys of every rank into the ring buffer at the pointer, wrapping at the end."""
        keys = all_gather_cat(keys)
        columns, dropped = ring_write(self.queue_pointer, keys.shape[0], self.queue_size)
        self.queue.index_copy_(1, columns, keys[dropped:].T.to(self.queue.dtype))


class GroupLoss(nn.Module):
    """DINO-like group discrimination: cross-entropy between sharpened, centred teacher and student.

    With student logits ``z_p`` of crop p, teacher logits ``y_t`` of global crop t, centre ``c`` and
    teacher temperature τₜ(epoch), each pair (t, p ≠ t) gives

        q_t = softmax((y_t − c) / τₜ)   (no gradient)
        ℓ(t, p) = mean over images of  −Σ_k q_t,k · log softmax(z_p / τₛ)_k

    and the loss is ``0.5·(mean_{p<2} ℓ + mean_{p≥2} ℓ)``, or the global mean alone without local
    crops. After the loss the centre moves towards the batch mean of the teacher logits over all
    ranks: ``c ← m·c + (1 − m)·mean(y)``.

    τₜ rises linearly per epoch from ``warmup_teacher_temp`` (epoch 0) to ``teacher_temp`` (epoch
    ``warmup_teacher_temp_epochs − 1``) and stays there, as the official code's per-epoch table does.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        *,
        n_crops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        epochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if n_crops < 2:
            raise ValueError(f"n_crops must count the 2 global crops at least, got {n_crops}")
        if not 0 <= warmup_teacher_temp_epochs <= epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must lie in [0, epochs={epochs}]"
            )
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.final_teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.epochs = epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        warmup = self.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return self.final_teacher_temp
        if warmup == 1:
            return self.warmup_teacher_temp
        fraction = epoch / (warmup - 1)
        return self.warmup_teacher_temp + fraction * (self.final_teacher_temp - self.warmup_teacher_temp)

    @torch.no_grad()
    def teacher_probabilities(self, teacher_logits: Tensor, epoch: int) -> Tensor:
        """Centred, sharpened teacher distribution [2·B, out_dim] (also what the collapse watch reads)."""
        return F.softmax((teacher_logits - self.center) / self.teacher_temperature(epoch), dim=-1)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, epoch: int) -> Tensor:
        batch = _check_crops(self.n_crops, student_logits, teacher_logits)
        with _full_precision(student_logits):
            teacher_probs = self.teacher_probabilities(teacher_logits.detach().float(), epoch)
            log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            # One contraction gives Σ_b Σ_k q·log p for every (teacher, student) crop pair at once.
            pair_losses = -torch.einsum(
                "tbk,pbk->tp", teacher_probs.view(2, batch, -1), log_probs.view(self.n_crops, batch, -1)
            )
            loss = _average_pairs(pair_losses / batch, self.n_crops)
        self._update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor) -> None:
        batch_center = all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class MugsObjective(nn.Module):
    """The Mugs objective (METHOD §1): the weighted mean of the enabled supervisions, each between the
    student outputs of every crop and the teacher outputs of the global crops of the same head.

    ``losses`` holds the loss modules by name (their queues and centre are what a checkpoint stores
    under ``"losses"``); the group loss also takes the epoch, which schedules its teacher temperature.
    """

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = weights

    @classmethod
    def from_config(cls, config: Config) -> MugsObjective:
        loss, n_crops, weights = config.loss, 2 + config.augment.n_local, config.loss.weights()
        losses: dict[str, nn.Module] = {}
        if "instance" in weights:
            losses["instance"] = InfoNCEQueueLoss(
                config.model.out_dim, loss.instance_queue_size, loss.instance_temp, n_crops
            )
        if "local_group" in weights:
            losses["local_group"] = InfoNCEQueueLoss(
                config.model.out_dim, loss.local_group_queue_size, loss.local_group_temp, n_crops
            )
        if "group" in weights:
            losses["group"] = GroupLoss(
                config.model.group_out_dim,
                n_crops=n_crops,
                warmup_teacher_temp=loss.group_warmup_teacher_temp,
                teacher_temp=loss.group_teacher_temp,
                warmup_teacher_temp_epochs=loss.group_warmup_teacher_temp_epochs,
                epochs=config.optim.epochs,
                student_temp=loss.group_student_temp,
            )
        return cls(losses, weights)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput, epoch: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted mean to back-propagate, and each loss by name (detached)."""
        losses = {}
        for name, loss_fn in self.losses.items():
            # in fp32 whatever the forward precision: softmaxes over 65536 prototypes and queues with
            # temperature 0.04-0.2 lose too much in half precision
            student_pred, teacher_target = getattr(student, name).float(), getattr(teacher, name).float()
            schedule = (epoch,) if isinstance(loss_fn, GroupLoss) else ()
            losses[name] = loss_fn(student_pred, teacher_target, *schedule)
        total = sum(self.weights[n] * v for n, v in losses.items()) / sum(self.weights[n] for n in losses)
        return total, {n: v.detach() for n, v in losses.items()}

    @property
    def group_loss(self) -> GroupLoss | None:
        """The group loss, whose centre and temperature the collapse watch reads; None when disabled."""
        return dict(self.losses.items()).get("group")
