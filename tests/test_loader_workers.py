"""``train.num_workers: auto``: each rank's share of the cores it may use, less one for itself."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mugs import distributed
from mugs.config import ConfigError, config_from_dict
from mugs.distributed import loader_workers
from mugs.launch.local import free_port

GPU, CPU = torch.device("cuda"), torch.device("cpu")  # loader_workers only reads the device type


def test_auto_is_the_default_and_numbers_pass_through():
    assert config_from_dict({}).train.num_workers == "auto"
    assert config_from_dict({"train": {"num_workers": 3}}).train.num_workers == 3
    assert loader_workers(3, GPU) == 3 and loader_workers(0, GPU) == 0 and loader_workers(3, CPU) == 3


@pytest.mark.parametrize("bad", [-1, "many", 2.5])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        config_from_dict({"train": {"num_workers": bad}})


@pytest.mark.parametrize(("cores", "workers"), [(16, 15), (2, 1), (1, 0)])
def test_auto_in_one_process_leaves_a_core_for_it(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loader_workers("auto", GPU) == workers
    # training on the CPU, worker processes would fight the training's threads for the cores
    assert loader_workers("auto", CPU) == 0


def _count_sharing(rank: int, world_size: int, port: int, cores: list[int] | None, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if cores is not None:  # as SLURM does when it binds each task to its own cores
            os.sched_setaffinity(0, {cores[rank]})
        results[rank] = (distributed.ranks_sharing_cores(), loader_workers("auto", GPU))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(cores: list[int] | None) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_count_sharing, args=(2, free_port(), cores, results), nprocs=2, join=True)
    return dict(results)


def test_ranks_that_see_the_same_cores_split_them():
    n = len(os.sched_getaffinity(0))
    assert _run_two_ranks(None) == {0: (2, max(0, n // 2 - 1)), 1: (2, max(0, n // 2 - 1))}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to bind ranks apart")
def test_ranks_bound_to_their_own_cores_do_not_split_them():
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert _run_two_ranks([first, second]) == {0: (1, 0), 1: (1, 0)}
