"""AdamW with DINO-style parameter groups, per-tensor gradient clipping and last-layer freezing."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from mugs.config import OptimConfig


def parameter_groups(
    model: nn.Module, *, patch_embed_lr_mult: float = 0.2, weight_decay: float = 0.04
) -> list[dict]:
    """Split the trainable parameters into up to four AdamW groups.

    ``no_decay`` holds biases and every 1-D tensor (norm weights); everything else is ``decay``,
    including ``cls_token``, ``pos_embed`` and the group head's weight-norm gain, as in DINO. Each is
    split again into a ``*_patch_embed`` group (names containing ``patch_embed``) whose learning rate
    is scaled by ``patch_embed_lr_mult``. ``weight_decay`` is only the initial value for the decayed
    groups; ``apply_schedules`` overwrites it every iteration. Empty groups are left out.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (name.endswith(".bias") or param.ndim == 1)
        buckets.setdefault((decayed, "patch_embed" in name), []).append(param)

    groups = []
    for decayed in (True, False):
        for patch_embed in (False, True):
            params = buckets.get((decayed, patch_embed))
            if not params:
                continue
            name = ("decay" if decayed else "no_decay") + ("_patch_embed" if patch_embed else "")
            groups.append(
                {
                    "params": params,
                    "name": name,
                    "apply_weight_decay": decayed,
                    "lr_mult": patch_embed_lr_mult if patch_embed else 1.0,
                    "weight_decay": weight_decay if decayed else 0.0,
                }
            )
    return groups


@torch.no_grad()
def clip_gradients_per_tensor(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Rescale each gradient whose L2 norm exceeds ``max_norm`` to norm ``max_norm``; return the norms.

    Each gradient is multiplied by ``min(1, max_norm / (‖g‖ + 1e-6))``. The factors are computed on the
    device and applied with foreach kernels, so no host synchronisation happens. Parameters without a
    gradient are skipped; the returned tensor stacks the norms before clipping, in parameter order.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.empty(0)
    norms = torch.stack(torch._foreach_norm(grads))
    factors = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the gradients of parameters named ``*last_layer*`` while ``epoch < freeze_last_layer``.

    Setting ``.grad = None`` (rather than zero) makes AdamW skip them entirely: no moment update and
    no weight decay.
    """
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def build_optimizer(
    groups: list[dict],
    *,
    lr: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``groups``: the fused kernel when every parameter is on CUDA, foreach otherwise.

    ``lr`` is only the initial value; ``apply_schedules`` sets it every iteration.
    """
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    implementation = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **implementation)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this iteration's values: lr × the group's ``lr_mult``, and the weight decay where it applies."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", False) else 0.0


def mixed_precision(
    precision: str, device: torch.device, key: str = "optim.precision"
) -> tuple[Callable[[], AbstractContextManager], torch.amp.GradScaler | None]:
    """``precision`` (the setting ``key``) on ``device``, for pretraining and fine-tuning alike: a
    factory of the forward pass's autocast context, and the gradient scaler fp16 needs.

    Autocast is CUDA only: on CPU, bf16 and fp16 are ignored with a warning, so a CPU run computes in
    fp32 whatever the preset says.
    """
    use_cuda_amp = device.type == "cuda" and precision != "fp32"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if use_cuda_amp and precision == "fp16" else None
    if precision != "fp32" and device.type == "cpu":
        warnings.warn(f"{key}={precision} is ignored on CPU (fp32 is used)", stacklevel=4)
    return functools.partial(torch.autocast, device.type, autocast_dtype, enabled=use_cuda_amp), scaler


def clip_norm(optim: OptimConfig, epoch: int) -> float:
    """The per-tensor gradient norm limit at ``epoch``: ``optim.clip_grad``, times
    ``optim.clip_grad_late_factor`` after ``optim.clip_grad_late_epoch``."""
    if optim.clip_grad_late_epoch is not None and epoch > optim.clip_grad_late_epoch:
        return optim.clip_grad * optim.clip_grad_late_factor
    return optim.clip_grad
