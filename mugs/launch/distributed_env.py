"""``torch.distributed`` set up from the environment SLURM and submitit give each task of a job."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import submitit
import torch
import torch.distributed as dist

_FIRST_PORT = 20000
_NUM_PORTS = 10000


def rendezvous_port(job_id: str) -> int:
    """TCP port of a job's process-group rendezvous, derived from its numeric SLURM job id.

    Two jobs that share a node get different ports unless their ids are ``_NUM_PORTS`` apart; the range
    stays below Linux's ephemeral ports (32768+), which outgoing connections take at random.
    """
    return _FIRST_PORT + int(job_id) % _NUM_PORTS


@contextlib.contextmanager
def slurm_process_group(env: submitit.JobEnvironment, backend: str) -> Iterator[None]:
    """One process group over all tasks of the job, its rendezvous on the first host of the node list.

    A single-task job gets none, like a plain local run. With NCCL each task takes the GPU of its local
    rank (SLURM shows every task all GPUs of its node).
    """
    if env.num_tasks == 1:
        yield
        return
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.hostnames[0]}:{rendezvous_port(env.raw_job_id)}",
        rank=env.global_rank,
        world_size=env.num_tasks,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
