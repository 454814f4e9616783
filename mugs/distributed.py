"""Device and rank helpers, and collectives that degrade to no-ops in a single, non-distributed process.

The model, the losses and the training engine call these instead of ``torch.distributed``
directly, so the same code runs in one CPU process and under gloo or NCCL.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def resolve_device(choice: str, setting: str = "train.device") -> torch.device:
    """The device of a ``device`` setting: "auto" is this process's current GPU when one is visible.

    A GPU asked for where none is visible is a ``ValueError`` naming ``setting``: a refusal before any
    work, not a crash."""
    if choice == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if choice.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{setting} is {choice!r} but no CUDA device is visible (CUDA_VISIBLE_DEVICES, drivers)"
        )
    return torch.device(choice)


def host_group() -> dist.ProcessGroup | None:
    """A group over all ranks for collectives on CPU tensors (host values such as flags), which then
    never wait for a GPU: the default group when it is gloo, else a new gloo group. None when not
    distributed. Every rank must call it at the same point, as any group creation.
    """
    if not is_distributed() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def ranks_sharing_cores(group: dist.ProcessGroup | None = None) -> int:
    """How many ranks, this one included, run on this host with CPU affinities that overlap this
    rank's: 1 where SLURM binds each task to its own cores, the ranks on the node where it does not
    (or where local processes all see every core). ``group`` must be able to gather host objects.
    """
    if not is_distributed():
        return 1
    mine = (socket.gethostname(), frozenset(os.sched_getaffinity(0)))
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return sum(host == mine[0] and bool(cores & mine[1]) for host, cores in everyone)


def loader_workers(
    setting: int | str, device: torch.device, host_group: dist.ProcessGroup | None = None
) -> int:
    """``train.num_workers`` as a number. "auto", training on a GPU: an equal share of the cores this
    rank may use with the other ranks on its host (:func:`ranks_sharing_cores`), less one
    core for the rank itself. Training on the CPU, or with no core to spare: 0, augmenting in the
    training process, since worker processes would compete with the training's own threads.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    share = len(os.sched_getaffinity(0)) // ranks_sharing_cores(host_group)
    return max(0, share - 1)


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); no gradient flows back."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input is left untouched)."""
    if not is_distributed():
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced)
    return reduced / world_size()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left untouched)."""
    if not is_distributed():
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, group=group)
    return reduced


def all_gather_objects(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` when not distributed."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (any picklable object; for rare host decisions)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, host_group: dist.ProcessGroup | None) -> bool:
    """True on every rank when any rank's flag is set, so all ranks stop at the same iteration.

    Asked every iteration, so it goes over the host group: through a GPU it would wait for the device.
    """
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), host_group).item() > 0)
