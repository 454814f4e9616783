"""Teacher update: exponential moving average of the student's parameters."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t ← m·t + (1 − m)·s`` for every teacher parameter and the student parameter of the same name.

    Student parameters the teacher lacks (the predictors) are ignored; buffers are not averaged.
    Raises ``KeyError`` naming the first teacher parameter without a student counterpart.
    """
    student_params = dict(student.named_parameters())
    teacher_side: list[torch.Tensor] = []
    student_side: list[torch.Tensor] = []
    for name, teacher_param in teacher.named_parameters():
        student_param = student_params.get(name)
        if student_param is None:
            raise KeyError(f"teacher parameter {name!r} has no student parameter of the same name")
        if student_param.shape != teacher_param.shape:
            raise ValueError(
                f"parameter {name!r}: teacher shape {tuple(teacher_param.shape)} "
                f"!= student shape {tuple(student_param.shape)}"
            )
        teacher_side.append(teacher_param)
        student_side.append(student_param)
    if teacher_side:
        # lerp(t, s, w) = t + w·(s − t) = (1 − w)·t + w·s, so w = 1 − m.
        torch._foreach_lerp_(teacher_side, student_side, 1.0 - momentum)
