"""Local launcher: one process, or N processes on this machine joined by ``torch.distributed``, for
every kind of long job (:mod:`mugs.launch.jobs`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import pickle
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mugs.config import Config, config_from_dict
from mugs.distributed import resolve_device
from mugs.launch.jobs import LongJob, Pretraining
from mugs.launch.signals import STOP_SIGNALS, StopOnSignals
from mugs.training.engine import TrainResult
from mugs.training.pretrain import locked_run_directory

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
    job: LongJob,
    progress: bool,
    results: Any,
    parent: int,
) -> None:
    # the launcher passes each stop signal on as SIGTERM; the terminal's Ctrl-C, which reaches every
    # process of the group, would otherwise count twice here and abort the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopOnSignals((signal.SIGTERM,)) as stop:
        # started with the stop signals blocked (see launch_local): one that came while this process
        # started is taken now, by the handler, as it would be later
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _stop_with_parent(parent)
        try:
            config = config_from_dict(config_values)
            _join_process_group(config, rank, world_size, port)
            try:
                result = job(config, stop_requested=stop, progress=progress and rank == 0, locked=True)
            finally:
                dist.destroy_process_group()
        except Exception as error:
            # the launcher raises it as a 1-rank run would, rather than a rank's traceback
            results.put(("error", _picklable(error)))
            sys.exit(1)
    if rank == 0:
        results.put(("result", (result.status, result.global_iteration, str(result.checkpoint))))


def _join_process_group(config: Config, rank: int, world_size: int, port: int) -> None:
    backend = backend_for(config.train.device)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def _picklable(error: Exception) -> Exception:
    """``error`` if the launcher can unpickle it, else a ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # an exception class whose constructor takes other arguments than its message
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


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
    job: LongJob | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run ``job`` (pretraining unless told) here; with ``nprocs > 1`` spawn that many ranks (gloo on
    CPU, NCCL on GPUs).

    SIGTERM or SIGINT stops the run after the current iteration with a checkpoint (status
    ``interrupted``, ``stopped_by`` the signal's name), also while the ranks start; a second one
    aborts it at once. A refusal (no device, the run's lock held, a checkpoint it cannot resume) or
    an error in a rank is raised here as in a 1-rank run.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    job = Pretraining() if job is None else job
    job.check(config, nprocs)
    # the launcher holds the lock for all its ranks: a second start is refused at once, before any
    # rank starts; the device is checked first, so a refused start leaves no run directory behind
    resolve_device(config.train.device)
    ranks: list[int] = []
    with StopOnSignals(forward_to=lambda: ranks) as stop, locked_run_directory(job.run_dir(config)):
        if nprocs == 1:
            result = job(config, stop_requested=stop, progress=progress, locked=True)
        else:
            result = _run_ranks(config, nprocs, job, progress, stop, ranks)
    return _named(result, stop)


def _run_ranks(
    config: Config,
    nprocs: int,
    job: LongJob,
    progress: bool,
    stop: StopOnSignals,
    ranks: list[int],
) -> TrainResult:
    """Spawn the ranks and wait for them; the result of rank 0, or the error a rank raised."""
    results = mp.get_context("spawn").SimpleQueue()
    # the ranks inherit the blocked stop signals: one sent while they import and set up is held until
    # their handler is in place, instead of killing them with a traceback here
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        processes = mp.start_processes(
            _worker,
            args=(nprocs, free_port(), config.to_dict(), job, progress, results, os.getpid()),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        ranks.extend(processes.pids())
        if stop():  # it came before there were ranks to pass it on to
            stop.forward()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    try:
        while not processes.join():
            pass
    except mp.ProcessException:
        if not results.empty():
            kind, value = results.get()
            if kind == "error":
                raise value from None
        raise
    kind, (status, iteration, checkpoint) = results.get()
    return TrainResult(status, iteration, None if checkpoint == "None" else Path(checkpoint))


def _named(result: TrainResult, stop: StopOnSignals) -> TrainResult:
    if result.status == "interrupted" and stop.received is not None:
        return dataclasses.replace(result, stopped_by=stop.received.name)
    return result
