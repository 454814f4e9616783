"""``launch_slurm`` against the real test cluster: layouts, preemption, time limits, reattaching, pre-flight.

Every run trains the same tiny ViT on 48 demo images (6 iterations per epoch, 2 epochs, gloo on CPU), so
their final checkpoints can be compared bit for bit. Jobs that must be interrupted sleep after each
iteration (``PacedJob``), which leaves their results unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from mugs.config import Config, DataConfig, config_from_dict, for_job, merge_values
from mugs.data.prepare import run_prepare
from mugs.data.sources import install_demo_data
from mugs.launch.jobs import Finetuning
from mugs.launch.local import launch_local
from mugs.launch.slurm import JobRecord, PreflightError, launch_slurm, query_job, wait_for_job
from mugs.rundir import RunDir, job_dir
from mugs.testing.compare import assert_same_finetuning, assert_same_run
from mugs.testing.configs import tiny_training_config
from mugs.testing.faults import finetune_reliability_config
from mugs.testing.finetuning import prepare_tiny_split, pretrained_checkpoint
from mugs.testing.slurm_jobs import PacedJob
from mugs.training import checkpoint as ckpt

if TYPE_CHECKING:  # conftest is pytest's to import; importing it again would make a second module
    from tests.integration.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

ITERATIONS = 12  # 2 epochs of 6
JOB_TIMEOUT_S = 240


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    base = tmp_path_factory.mktemp("data")
    base.chmod(0o755)
    data = DataConfig(
        root=str(base / "raw"), prepared_dir=str(base / "prepared"), max_per_class=10, workers=1
    )
    install_demo_data(Path(data.root))
    run_prepare(data, progress=False)
    return data


def tiny_config(data: DataConfig, output_dir: Path, **launch: object) -> Config:
    return tiny_training_config(
        output_dir,
        {
            "data": {"root": data.root, "prepared_dir": data.prepared_dir, "train_subset": 48},
            # what the published presets use, for the promise of exact resume
            "model": {"drop_path_rate": 0.1},
            "augment": {"weak_prob": 0.5, "erasing_prob": 0.5},
            "train": {"keep_every_epochs": 0},
            "launch": {
                "launcher": "slurm",
                "partition": "cpu",
                "nodes": 1,
                "tasks_per_node": 2,
                "cpus_per_task": 1,
                # over 10 min: submitit takes any signal within 10 min of the limit for a time-out
                "timeout_min": 30,
                "signal_delay_s": 30,
                "poll_seconds": 0.5,
                **launch,
            },
        },
    )


@pytest.fixture(scope="module", autouse=True)
def cluster_env(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster's variables in this process for the whole module: launch_slurm runs sbatch and squeue."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in slurm_cluster.env.items():
            patch.setenv(key, value)
        patch.setenv("COLUMNS", "200")  # rich must not wrap the launcher's messages
        yield slurm_cluster


def losses(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"iteration"' in line]
    return [{key: r[key] for key in ("loss", "instance", "local_group", "group")} for r in records]


def assert_same_losses(run_dir: Path, expected_dir: Path) -> None:
    got, expected = losses(run_dir), losses(expected_dir)
    assert len(got) == len(expected) == ITERATIONS
    for a, b in zip(got, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def assert_bit_identical(run_dir: Path, expected_dir: Path) -> None:
    """Every tensor of every checkpoint (optimizer and RNG states included), DONE and the log."""
    assert ckpt.load_checkpoint(RunDir(run_dir).latest)["global_iteration"] == ITERATIONS
    assert_same_run(run_dir, expected_dir)


def allocation(cluster: SlurmCluster, job_id: str) -> list[dict[str, str]]:
    """The job's allocation records, earlier runs of a requeued job first, once accounting shows it ended."""

    def records() -> list[dict[str, str]]:
        return [r for r in cluster.sacct(job_id, duplicates=True) if r["JobID"] == job_id]

    _wait_for(lambda: records()[-1:] and records()[-1]["State"] == "COMPLETED", f"sacct: {job_id} done", 20)
    return records()


def jobs_named(cluster: SlurmCluster, name: str) -> set[str]:
    """Ids of every job ever submitted with this name, in accounting or still in the queue."""
    queued = cluster.run("squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i").split()
    accounted = cluster.run("sacct", "-X", "-n", "-P", f"--name={name}", "-S", "2000-01-01", "-o", "JobID")
    return set(queued) | set(accounted.split())


def checkpoint_position(run_dir: Path) -> tuple[int, int]:
    state = ckpt.load_checkpoint(RunDir(run_dir).latest)
    return state["epoch"], state["iteration_in_epoch"]


def paced(seconds: float) -> Callable[..., PacedJob]:
    return functools.partial(PacedJob, seconds_per_iteration=seconds)


@pytest.fixture(scope="module")
def local_run(prepared: DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("local")
    config = tiny_config(prepared, output_dir, launcher="local")
    result = launch_local(config, nprocs=2, progress=False)
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    return output_dir


@pytest.fixture(scope="module")
def reference(prepared: DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 1 node × 2 tasks SLURM run."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = launch_slurm(tiny_config(prepared, output_dir), progress=False)
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    return output_dir


def test_one_node_two_tasks_matches_the_local_two_process_run(
    cluster_env: SlurmCluster, reference: Path, local_run: Path
) -> None:
    assert_same_losses(reference, local_run)
    job_id = JobRecord.load(RunDir(reference)).job_id
    (record,) = allocation(cluster_env, job_id)
    assert (record["AllocNodes"], record["Partition"], record["ExitCode"]) == ("1", "cpu", "0:0")


def test_two_nodes_one_task_matches_the_local_two_process_run(
    cluster_env: SlurmCluster, prepared: DataConfig, reference: Path, local_run: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "two-nodes"
    result = launch_slurm(tiny_config(prepared, output_dir, nodes=2, tasks_per_node=1), progress=False)
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    assert_same_losses(output_dir, local_run)
    assert_bit_identical(output_dir, reference)  # two gloo ranks sum the same way on one node or two
    (record,) = allocation(cluster_env, JobRecord.load(RunDir(output_dir)).job_id)
    assert (record["AllocNodes"], record["NodeList"]) == ("2", "node[1-2]")


def test_preempted_by_usr2_and_by_the_urgent_partition_resumes_bit_identically(
    cluster_env: SlurmCluster, prepared: DataConfig, reference: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "preempted"
    config = tiny_config(prepared, output_dir)
    record = launch_slurm(config, wait=False, progress=False, job_class=paced(1.5))
    job_id = record.job_id

    def reached(iteration: int) -> Callable[[], bool]:
        log = output_dir / "log.jsonl"
        return lambda: log.exists() and f'"global_iteration": {iteration},' in log.read_text()

    def requeued(times: int) -> Callable[[], bool]:
        return lambda: query_job(job_id).restarts >= times

    _wait_for(reached(2), "iteration 2")
    cluster_env.run("scancel", "--signal=USR2", job_id)
    _wait_for(requeued(1), "the requeue after USR2")
    first_stop = checkpoint_position(output_dir)
    assert first_stop[0] == 0 and 0 < first_stop[1] < 6  # written mid-epoch, after the signal

    _wait_for(reached(7), "iteration 7, in the second epoch")
    node = cluster_env.run("squeue", "-h", "-j", job_id, "-o", "%N").strip()
    # the job holds both CPUs of its node: the urgent job can only start there by preempting it
    urgent = ["sbatch", "--parsable", "--partition=urgent", f"--nodelist={node}", "--cpus-per-task=1"]
    cluster_env.run(*urgent, f"--output={tmp_path}/urgent-%j.out", "--wrap=sleep 1")
    _wait_for(requeued(2), "the requeue after preemption")
    second_stop = checkpoint_position(output_dir)
    assert second_stop[0] == 1 and 0 < second_stop[1] < 6

    result = wait_for_job(record, config)
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    assert_bit_identical(output_dir, reference)
    states = [r["State"] for r in allocation(cluster_env, job_id)]
    assert len(states) == 3 and states[0] == "REQUEUED" and states[1] in ("PREEMPTED", "REQUEUED")


def test_a_run_longer_than_its_time_limit_completes_through_requeues(
    cluster_env: SlurmCluster, prepared: DataConfig, reference: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "time-limited"
    # slurmctld checks limits every 30 s and signals once at most signal_delay_s + 30 s remain: with a
    # 1-minute limit, 20-50 s after the start (sooner could hit a Python not yet handling the signal), so
    # each run trains at most ~40 s of the 48 s needed
    config = tiny_config(prepared, output_dir, timeout_min=1, signal_delay_s=10, max_num_timeout=10)
    result = launch_slurm(config, progress=False, job_class=paced(4.0))
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    assert_bit_identical(output_dir, reference)
    record = JobRecord.load(RunDir(output_dir))
    states = [r["State"] for r in allocation(cluster_env, record.job_id)]
    assert len(states) >= 2 and set(states[:-1]) == {"REQUEUED"}
    # each requeue answered the time limit's signal (not a preemption), as submitit counts them
    log = (Path(record.folder) / f"{record.job_id}_0_log.err").read_text()
    assert log.count("this job is timed-out") == len(states) - 1


def test_a_restarted_launcher_reattaches_instead_of_submitting_again(
    cluster_env: SlurmCluster, prepared: DataConfig, tmp_path: Path
) -> None:
    output_dir = tmp_path / f"reattached-{uuid.uuid4().hex[:8]}"  # the job name: unique in sacct
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config(prepared, output_dir, launcher="local").to_dict()))
    command = [sys.executable, "-m", "mugs.cli", "pretrain", "-c", str(params), "--launcher", "slurm"]
    command.append("--no-progress")

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_file = output_dir / "slurm" / "job.json"
    _wait_for(lambda: record_file.exists() or first.poll() is not None, "the first launcher to submit", 60)
    first.kill()  # as when a login session dies
    first.wait()
    job_id = json.loads(record_file.read_text())["job_id"]
    assert query_job(job_id).active

    second = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=os.environ)
    assert second.returncode == 0, second.stderr
    assert f"reattaching to SLURM job {job_id}" in second.stderr
    assert "pretraining finished at global iteration 12" in second.stderr

    third = subprocess.run(command, capture_output=True, text=True, timeout=60, env=os.environ)
    assert third.returncode == 0 and "has finished already" in third.stderr, third.stderr
    allocation(cluster_env, job_id)  # accounting has caught up with the job
    assert jobs_named(cluster_env, f"mugs-{output_dir.name}") == {job_id}


# values set on the config after it was built (bypassing validation, as code that edits a Config can),
# "{tmp}" standing for the test's temporary directory; and the message expected
PREFLIGHT_CASES = {
    "no-prepared-data": (
        {"data.prepared_dir": "{tmp}/nothing"},
        "prepared data missing in .*nothing .*no summary.json, manifest-train.jsonl, stats.json",
    ),
    "invalid-config": (
        {"optim.warmup_epochs": 5},
        "does not validate: optim.warmup_epochs=5 exceeds optim.epochs=2",
    ),
    "batch-not-divisible": (
        {"launch.tasks_per_node": 3},
        r"optim.batch_size=8 does not divide by the world size 3 "
        r"\(launch.nodes=1 × launch.tasks_per_node=3\)",
    ),
    "unknown-partition": (
        {"launch.partition": "bigmem"},
        r"partition 'bigmem' \(launch.partition\) does not exist; partitions: cpu, gpu, urgent",
    ),
    "too-many-nodes": ({"launch.nodes": 3}, "launch.nodes=3 but partition 'cpu' has 2 nodes"),
    "too-many-gpus": (
        {"launch.partition": "gpu", "launch.gpus_per_node": 4, "launch.tasks_per_node": 4},
        "launch.gpus_per_node=4 but partition 'gpu' has at most 2 GPUs per node",
    ),
    "output-not-writable": (
        {"train.output_dir": "{tmp}/a-file/run"},
        r"output directory .*a-file/run \(train.output_dir\) is not writable",
    ),
}


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_preflight_errors_name_the_problem_and_submit_nothing(
    cluster_env: SlurmCluster, prepared: DataConfig, tmp_path: Path, case: str
) -> None:
    (tmp_path / "a-file").write_text("")
    output_dir = tmp_path / f"preflight-{uuid.uuid4().hex[:8]}"
    changes, message = PREFLIGHT_CASES[case]
    config = tiny_config(prepared, output_dir)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(
            getattr(config, section), key, value.format(tmp=tmp_path) if isinstance(value, str) else value
        )
    with pytest.raises(PreflightError, match=message):
        launch_slurm(config, progress=False)
    assert not (Path(config.train.output_dir) / "slurm" / "job.json").exists()
    assert jobs_named(cluster_env, f"mugs-{Path(config.train.output_dir).name}") == set()


@pytest.mark.slow
def test_a_job_in_the_podman_image_matches_the_host_run(
    cluster_env: SlurmCluster, prepared: DataConfig, reference: Path, tmp_path: Path
) -> None:
    # the image of tests/test_container.py: this checkout on a debootstrap Debian base (built or reused)
    from tests.test_container import build_test_image, runtime_options

    image = build_test_image()
    output_dir = tmp_path / f"in-image-{uuid.uuid4().hex[:8]}"
    started = time.time()
    config = tiny_config(
        prepared,
        output_dir,
        container=image,
        container_runtime="podman",
        container_options=[*runtime_options(), "--label", f"mugs-test={output_dir.name}"],
    )
    result = launch_slurm(config, progress=False)
    assert (result.status, result.global_iteration) == ("finished", ITERATIONS)
    # both ranks ran in containers of the image (podman's own record of what it started)
    filters = [
        "--since",
        str(int(started)),
        "--filter",
        "event=start",
        "--filter",
        f"label=mugs-test={output_dir.name}",
    ]
    events = subprocess.run(
        ["podman", "events", "--stream=false", *filters, "--format", "{{.Image}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(events) == 2 and all(image in event for event in events), events
    assert_bit_identical(output_dir, reference)


# ---------------------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def finetuning(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, str, Path]:
    """A fine-tuning config whose job is 2 nodes × 1 task (launch.jobs.finetune) while pretraining's is
    1 × 2; the tiny pretrained checkpoint; an uninterrupted local 2-process run's metrics file."""
    directory = tmp_path_factory.mktemp("finetuning")
    directory.chmod(0o755)
    prepared = prepare_tiny_split(directory)
    checkpoint = pretrained_checkpoint(
        directory / "pretrained.pt", finetune_reliability_config("model.depth=2")
    )
    values = merge_values(
        finetune_reliability_config().to_dict(),
        {
            "data": {"root": str(directory / "data"), "prepared_dir": str(prepared)},
            # absolute, as the SLURM launcher makes it: the metrics' provenance holds the config's digest
            "train": {"output_dir": str(directory / "pretrain")},
            "launch": tiny_config(DataConfig(), directory).to_dict()["launch"]
            | {"jobs": {"finetune": {"nodes": 2, "tasks_per_node": 1}}},
        },
    )
    config = config_from_dict(values)
    local = directory / "local" / "finetune.json"
    result = launch_local(config, 2, job=Finetuning(str(checkpoint), str(local)), progress=False)
    assert (result.status, result.global_iteration) == ("finished", 6)
    return config, str(checkpoint), local


def test_finetuning_as_a_two_node_job_preempted_by_usr2_resumes_bit_identically(
    cluster_env: SlurmCluster, finetuning: tuple[Config, str, Path], tmp_path: Path
) -> None:
    """The pretraining launcher runs fine-tuning with its kind's resources; USR2 stops it after the
    iteration with a checkpoint, it requeues and ends as the local two-process run (gloo sums alike)."""
    config, checkpoint, local = finetuning
    out = tmp_path / "finetune.json"
    job = Finetuning(checkpoint, str(out))
    record = launch_slurm(config, job=job, wait=False, progress=False, job_class=paced(2.0))
    latest = RunDir(job_dir(out)).latest
    _wait_for(latest.exists, "the first fine-tuning checkpoint (iteration 2)")
    cluster_env.run("scancel", "--signal=USR2", record.job_id)
    _wait_for(lambda: query_job(record.job_id).restarts >= 1, "the requeue after USR2")
    stopped = ckpt.load_checkpoint(latest)["global_iteration"]
    assert 2 <= stopped < 6
    result = wait_for_job(record, for_job(config, "finetune"))
    assert (result.status, result.global_iteration) == ("finished", 6)
    assert_same_finetuning(job_dir(out), job_dir(local))
    states = allocation(cluster_env, record.job_id)
    assert [s["State"] for s in states] == ["REQUEUED", "COMPLETED"]
    assert (states[-1]["AllocNodes"], states[-1]["NodeList"]) == ("2", "node[1-2]")
    assert "mugs-finetune" in cluster_env.run("sacct", "-X", "-n", "-P", "-j", record.job_id, "-o", "JobName")
