"""Local launcher: one process, or N processes on this machine joined by ``torch.distributed``."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import signal
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from mugs.config import Config, config_from_dict
from mugs.launch.signals import StopOnSignals
from mugs.training.engine import TrainResult
from mugs.training.pretrain import run_pretraining

PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


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
    parent: int,
) -> None:
    # the launcher passes each stop signal on as SIGTERM; the terminal's Ctrl-C, which reaches every
    # process of the group, would otherwise count twice here and abort the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = config_from_dict(config_values)
    backend = backend_for(config.train.device)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        with StopOnSignals((signal.SIGTERM,)) as stop:
            _stop_with_parent(parent)
            result = run_pretraining(
                config,
                dataset=dataset,
                mean_std=mean_std,
                stop_requested=stop,
                progress=progress and rank == 0,
            )
        if rank == 0:
            results.put((result.status, result.global_iteration, str(result.checkpoint)))
    finally:
        dist.destroy_process_group()


def _stop_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM (a clean stop) when the launcher dies, even of SIGKILL: orphaned
    ranks would otherwise train on, holding the run's lock, with nobody waiting for them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def launch_local(
    config: Config,
    nprocs: int = 1,
    *,
    dataset: Dataset | None = None,
    mean_std: tuple | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run pretraining here; with ``nprocs > 1`` spawn that many ranks (gloo on CPU, NCCL on GPUs).

    SIGTERM or SIGINT stops the run after the current iteration with a checkpoint (status
    ``interrupted``, ``stopped_by`` the signal's name); a second one aborts it at once.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if config.optim.batch_size % nprocs:
        raise ValueError(f"optim.batch_size={config.optim.batch_size} is not divisible by {nprocs} processes")
    if nprocs == 1:
        with StopOnSignals() as stop:
            result = run_pretraining(
                config, dataset=dataset, mean_std=mean_std, stop_requested=stop, progress=progress
            )
        return _named(result, stop)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    ranks: list[int] = []
    with StopOnSignals(forward_to=lambda: ranks) as stop:
        processes = mp.start_processes(
            _worker,
            args=(nprocs, free_port(), config.to_dict(), dataset, mean_std, progress, results, os.getpid()),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        ranks.extend(processes.pids())
        while not processes.join():
            pass
    status, iteration, checkpoint = results.get()
    return _named(TrainResult(status, iteration, None if checkpoint == "None" else Path(checkpoint)), stop)


def _named(result: TrainResult, stop: StopOnSignals) -> TrainResult:
    if result.status == "interrupted" and stop.received is not None:
        return dataclasses.replace(result, stopped_by=stop.received.name)
    return result
