"""Local launcher: one process, or N processes on this machine joined by ``torch.distributed``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from mugs.config import Config, config_from_dict
from mugs.training.engine import TrainResult
from mugs.training.pretrain import run_pretraining


def free_port() -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def backend_for(device_choice: str) -> str:
    """NCCL when the run uses GPUs, gloo on CPU."""
    uses_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    return "nccl" if uses_cuda else "gloo"


def _worker(
    rank: int,
    world_size: int,
    port: int,
    config_values: dict[str, Any],
    dataset: Dataset | None,
    mean_std: tuple | None,
    progress: bool,
    results: Any,
) -> None:
    config = config_from_dict(config_values)
    backend = backend_for(config.train.device)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = run_pretraining(config, dataset=dataset, mean_std=mean_std, progress=progress and rank == 0)
        if rank == 0:
            results.put((result.status, result.global_iteration, str(result.checkpoint)))
    finally:
        dist.destroy_process_group()


def launch_local(
    config: Config,
    nprocs: int = 1,
    *,
    dataset: Dataset | None = None,
    mean_std: tuple | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run pretraining here; with ``nprocs > 1`` spawn that many ranks (gloo on CPU, NCCL on GPUs)."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if config.optim.batch_size % nprocs:
        raise ValueError(f"optim.batch_size={config.optim.batch_size} is not divisible by {nprocs} processes")
    if nprocs == 1:
        return run_pretraining(config, dataset=dataset, mean_std=mean_std, progress=progress)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(nprocs, free_port(), config.to_dict(), dataset, mean_std, progress, results),
        nprocs=nprocs,
        join=True,
        start_method="spawn",
    )
    status, iteration, checkpoint = results.get()
    return TrainResult(status, iteration, None if checkpoint == "None" else Path(checkpoint))
