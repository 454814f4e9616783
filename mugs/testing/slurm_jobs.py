"""Small job functions that the integration tests submit through submitit to the test SLURM cluster.

They live in the package, not in the test modules: submitit pickles a function by reference, and the
job, which runs ``python -m submitit.core._submit``, can import ``mugs`` but not pytest's modules.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.distributed as dist

from mugs.distributed import all_reduce_sum
from mugs.launch.distributed_env import rendezvous_port
from mugs.launch.jobs import LongJob
from mugs.launch.slurm import RequeueingJob


def distributed_sum(value: float) -> tuple[int, int, str, float]:
    """Join a gloo process group over all tasks of the job and sum ``value + rank`` over ranks.

    With ``W`` tasks every rank returns ``(rank, W, hostname, W * value + W * (W - 1) / 2)``. The rendezvous
    is on the first host of the job's node list, as a multi-node launcher would do it.
    """
    env = submitit.JobEnvironment()
    master = env.hostnames[0]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}:{rendezvous_port(env.raw_job_id)}",
        rank=env.global_rank,
        world_size=env.num_tasks,
    )
    try:
        total = all_reduce_sum(torch.tensor([value + env.global_rank], dtype=torch.float64))
    finally:
        dist.destroy_process_group()
    return env.global_rank, env.num_tasks, socket.gethostname(), total.item()


def visible_gpus() -> tuple[str, str | None]:
    """The job's host and the ``CUDA_VISIBLE_DEVICES`` SLURM gave it (``None`` when unset)."""
    return socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES")


class ResumableCount(submitit.helpers.Checkpointable):
    """Count to ``steps``, one step every ``interval`` seconds, surviving preemption.

    On preemption submitit pickles this object (with ``self.step``) and requeues the job, so a restart
    goes on from the step reached. Each start appends ``"<SLURM_RESTART_COUNT> <step>"`` to
    ``progress_file`` (after submitit has installed its signal handlers), which tells a test when the job
    may be preempted. Returns the ``(restart count, first step)`` of every start.
    """

    def __init__(self) -> None:
        self.step = 0
        self.starts: list[tuple[int, int]] = []

    def __call__(self, steps: int, interval: float, progress_file: str) -> list[tuple[int, int]]:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.starts.append((restarts, self.step))
        with Path(progress_file).open("a") as f:
            f.write(f"{restarts} {self.step}\n")
        while self.step < steps:
            time.sleep(interval)
            self.step += 1
        return self.starts


class PacedJob(RequeueingJob):
    """:class:`RequeueingJob` that sleeps ``seconds_per_iteration`` after each iteration of a tiny model.

    Tests need runs long enough to be preempted mid-epoch or to cross time limits; sleeping, rather than
    training a bigger model, keeps them from loading the machine, and leaves the results unchanged.
    """

    def __init__(self, config_values: dict[str, Any], job: LongJob, seconds_per_iteration: float) -> None:
        super().__init__(config_values, job)
        self.seconds_per_iteration = seconds_per_iteration

    def stop_requested(self) -> bool:
        time.sleep(self.seconds_per_iteration)
        return super().stop_requested()
