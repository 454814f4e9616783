"""The test SLURM cluster behaves like the real clusters the pipeline targets.

Two nodes in partitions cpu/gpu/urgent, multi-node submitit jobs with a gloo process group, accounting
through sacct, fake GPUs, and preemption by the urgent partition that submitit survives by
checkpointing and requeueing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import submitit

from mugs.testing.slurm_jobs import ResumableCount, distributed_sum, visible_gpus

if TYPE_CHECKING:  # conftest is pytest's to import; importing it again would make a second module
    from tests.integration.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 60


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def _executor(folder: Path, **parameters: object) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=folder)
    # over 10 minutes: submitit takes a signal that comes within 10 minutes of the limit for a time-out
    executor.update_parameters(time=30, **parameters)
    return executor


def _result(job: submitit.Job) -> object:
    _wait_for(job.done, f"job {job.job_id}")
    return job.result()


@pytest.fixture(scope="module")
def distributed_job(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> tuple[submitit.Job, list[tuple[int, int, str, float]]]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in slurm_cluster.env.items():
            patch.setenv(key, value)
        folder = tmp_path_factory.mktemp("distributed")
        executor = _executor(folder, partition="cpu", nodes=2, ntasks_per_node=1)
        job = executor.submit(distributed_sum, 1.5)
        _wait_for(job.done, f"job {job.job_id}")
        return job, job.results()


def test_two_idle_nodes_in_every_partition(slurm_cluster: SlurmCluster) -> None:
    lines = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %R %t %c").splitlines()
    # node, partition, state, CPUs: 2 CPUs declared per node although they share this machine's cores
    expected = {(n, p, "idle", "2") for n in ("node1", "node2") for p in ("cpu", "gpu", "urgent")}
    assert {tuple(line.split()) for line in lines} == expected


def test_submitit_job_spans_two_nodes_with_one_process_group(distributed_job) -> None:
    _, results = distributed_job
    # ranks 0 and 1 contribute 1.5 + rank: 1.5 + 2.5 = 4.0 on each rank
    assert sorted((rank, world, total) for rank, world, _, total in results) == [(0, 2, 4.0), (1, 2, 4.0)]
    assert sorted(host for _, _, host, _ in results) == ["node1", "node2"]


def test_sacct_reports_the_finished_job(slurm_cluster: SlurmCluster, distributed_job) -> None:
    job, _ = distributed_job
    expected = {
        "State": "COMPLETED",
        "Partition": "cpu",
        "AllocNodes": "2",
        "NodeList": "node[1-2]",
        "ExitCode": "0:0",
    }

    def allocation() -> dict[str, str | None]:
        records = [r for r in slurm_cluster.sacct(job.job_id) if r["JobID"] == job.job_id]
        return {key: records[0][key] if records else None for key in expected}

    # accounting lags behind the job, and under load a record may first lack fields such as Partition
    deadline = time.monotonic() + 20
    while (record := allocation()) != expected and time.monotonic() < deadline:
        time.sleep(0.25)
    assert record == expected


def test_gpu_partition_hands_out_fake_gpus(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    job = _executor(tmp_path, partition="gpu", gpus_per_node=1).submit(visible_gpus)
    host, devices = _result(job)
    assert host in {"node1", "node2"}
    assert devices == "0"


def test_urgent_partition_preempts_and_submitit_resumes(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    progress = tmp_path / "progress.txt"
    # two CPUs fill a node, so the urgent job below can only run there by preempting this one
    executor = _executor(tmp_path, partition="cpu", nodes=1, ntasks_per_node=1, cpus_per_task=2)
    steps = 20  # 5 s of counting: ample time to be preempted on a loaded machine
    job = executor.submit(ResumableCount(), steps, 0.25, str(progress))
    _wait_for(lambda: progress.exists() and progress.read_text() == "0 0\n", "the job to start counting")
    time.sleep(1.0)  # let it count a few steps, which the checkpoint must carry over
    node = slurm_env.run("squeue", "-h", "-j", job.job_id, "-o", "%N").strip()
    sbatch = ["sbatch", "--parsable", "--partition=urgent", f"--nodelist={node}", "--cpus-per-task=1"]
    urgent = slurm_env.run(*sbatch, f"--output={tmp_path}/urgent-%j.out", "--wrap=sleep 1").strip()

    first, second = _result(job)
    assert first == (0, 0)
    restarts, resumed_at = second
    assert restarts == 1
    assert 0 < resumed_at < steps  # resumed from the checkpoint, not from scratch

    def runs() -> list[str]:
        return [r["State"] for r in slurm_env.sacct(job.job_id, duplicates=True) if r["JobID"] == job.job_id]

    # the result file appears a moment before the job ends, and accounting lags behind
    _wait_for(lambda: runs()[-1:] == ["COMPLETED"], f"sacct to show {job.job_id} COMPLETED", 20)
    assert runs() in (["PREEMPTED", "COMPLETED"], ["REQUEUED", "COMPLETED"])
    assert slurm_env.sacct(urgent)[0]["State"] == "COMPLETED"
