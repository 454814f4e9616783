"""The SLURM launcher without a cluster: sinfo parsing, pre-flight checks, reattach decisions, the sbatch
script and Apptainer command it builds, and the job's handling of the preemption signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import yaml

from mugs.config import Config, config_from_dict
from mugs.launch import jobs, slurm
from mugs.launch.jobs import Finetuning
from mugs.launch.slurm import (
    JobRecord,
    JobStatus,
    Partition,
    RequeueingJob,
    container_python,
    decide,
    launch_slurm,
    parse_gpu_count,
    parse_partitions,
    preflight_problems,
    preflight_warnings,
    query_job,
    read_progress,
    sbatch_parameters,
    status_line,
)
from mugs.rundir import RunDir
from mugs.training.engine import TrainResult
from mugs.training.run_lock import RunLockedError

PARTITIONS = {
    "cpu": Partition("cpu", nodes=2, max_gpus_per_node=0, default=True),
    "gpu": Partition("gpu", nodes=2, max_gpus_per_node=2),
}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A launchable config: fake prepared data (the files the checks look for) and a fresh run dir."""
    root, prepared = tmp_path / "raw", tmp_path / "prepared"
    root.mkdir()
    prepared.mkdir()
    (prepared / "summary.json").write_text(json.dumps({"root": str(root)}))
    (prepared / "manifest-train.jsonl").write_text("")
    (prepared / "stats.json").write_text("{}")
    return config_from_dict(
        {
            "optim": {"batch_size": 8, "epochs": 2, "warmup_epochs": 1},
            "data": {"root": str(root), "prepared_dir": str(prepared)},
            "train": {"output_dir": str(tmp_path / "run")},
            "launch": {"launcher": "slurm", "nodes": 2, "tasks_per_node": 2, "partition": "cpu"},
        }
    )


def test_gpu_counts_from_sinfo_gres() -> None:
    assert parse_gpu_count("gpu:2") == 2
    assert parse_gpu_count("gpu:a100:4(S:0-1),shard:8") == 4
    assert parse_gpu_count("gpu:a100:2,gpu:v100:1") == 3
    assert parse_gpu_count("(null)") == 0


def test_partitions_from_sinfo_merge_node_groups() -> None:
    text = "cpu*|2|(null)\ngpu|1|gpu:a100:4(S:0-1)\ngpu|3|gpu:2\n"
    assert parse_partitions(text) == {
        "cpu": Partition("cpu", 2, 0, default=True),
        "gpu": Partition("gpu", 4, 4, default=False),
    }


def test_a_sound_config_passes_the_checks(config: Config) -> None:
    assert preflight_problems(config, PARTITIONS) == []
    config.launch.partition = None  # the default partition, cpu
    assert preflight_problems(config, PARTITIONS) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"launch.tasks_per_node": 3},
            "optim.batch_size=8 does not divide by the world size 6 "
            "(launch.nodes=2 × launch.tasks_per_node=3)",
        ),
        ({"optim.warmup_epochs": 3}, "does not validate: optim.warmup_epochs=3 exceeds optim.epochs=2"),
        (
            {"launch.partition": "big"},
            "partition 'big' (launch.partition) does not exist; partitions: cpu, gpu",
        ),
        ({"launch.nodes": 4}, "launch.nodes=4 but partition 'cpu' has 2 nodes"),
        (
            {"launch.gpus_per_node": 2, "launch.tasks_per_node": 2},
            "launch.gpus_per_node=2 but partition 'cpu' has no GPUs (GRES)",
        ),
        (
            {"launch.gpus_per_node": 4, "launch.tasks_per_node": 4, "launch.partition": "gpu"},
            "launch.gpus_per_node=4 but partition 'gpu' has at most 2 GPUs per node",
        ),
        (
            {"launch.gpus_per_node": 2, "launch.tasks_per_node": 1, "launch.partition": "gpu"},
            "launch.tasks_per_node=1 must equal launch.gpus_per_node=2: one rank per GPU",
        ),
        ({"launch.container": "/no/such/image.sif"}, "container image /no/such/image.sif"),
    ],
)
def test_each_problem_is_named(config: Config, changes: dict, expected: str) -> None:
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(config, section), key, value)
    problems = preflight_problems(config, PARTITIONS)
    assert len(problems) == 1 and expected in problems[0], problems


def test_missing_data_unwritable_output_and_no_sinfo_are_all_reported(config: Config, tmp_path: Path) -> None:
    (tmp_path / "prepared" / "stats.json").unlink()
    (tmp_path / "blocker").write_text("")
    config.train.output_dir = str(tmp_path / "blocker" / "run")
    problems = preflight_problems(config, None)
    assert len(problems) == 3
    assert "prepared data missing in" in problems[0] and "no stats.json; run `mugs prepare`" in problems[0]
    assert problems[1].startswith("sinfo failed")
    assert problems[2].startswith(
        f"output directory {tmp_path}/blocker/run (train.output_dir) is not writable"
    )


def test_gpu_ranks_without_cpus_for_their_loaders_are_warned_about(config: Config) -> None:
    config.launch.gpus_per_node, config.launch.partition = 2, "gpu"
    assert preflight_problems(config, PARTITIONS) == []  # it can run: a warning, not a refusal
    (warning,) = preflight_warnings(config)
    assert "launch.cpus_per_task is not set" in warning and "train.num_workers" in warning
    config.launch.cpus_per_task = 16
    assert preflight_warnings(config) == []
    config.launch.cpus_per_task, config.train.num_workers = None, 8
    assert preflight_warnings(config) == []
    config.launch.gpus_per_node, config.launch.partition, config.train.num_workers = 0, "cpu", "auto"
    assert preflight_warnings(config) == []  # CPU ranks augment in their own process anyway


def test_no_default_partition(config: Config) -> None:
    config.launch.partition = None
    assert preflight_problems(config, {"gpu": PARTITIONS["gpu"]}) == [
        "launch.partition is not set and the cluster has no default partition"
    ]


@pytest.mark.parametrize(
    ("state", "finished", "action"),
    [
        (None, False, "submit"),  # never submitted
        (None, True, "finished"),  # finished without SLURM, or the record is gone
        ("PENDING", False, "attach"),
        ("RUNNING", True, "attach"),  # DONE is written before the job ends
        ("REQUEUED", False, "attach"),
        ("PREEMPTED", False, "submit"),  # settled: not requeued, so cancelled by the preemption
        ("COMPLETED", True, "finished"),
        ("FAILED", False, "submit"),
        ("CANCELLED", False, "submit"),
        ("TIMEOUT", False, "submit"),  # out of time-outs: resume from latest.pt
        ("UNKNOWN", False, "submit"),  # neither squeue nor sacct knows it any more
    ],
)
def test_decisions_on_a_run_directory(state: str | None, finished: bool, action: str) -> None:
    assert decide(None if state is None else JobStatus(state), finished) == action


def test_job_state_from_squeue_then_sacct(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "squeue": "PENDING|BeginTime\n",
        "sacct": "REQUEUED\nPREEMPTED\nPENDING\n",
    }

    def fake(*command: str) -> str:
        if answers[command[0]] is None:
            raise slurm.SlurmJobError(f"{command[0]} failed")
        return answers[command[0]]

    monkeypatch.setattr(slurm, "slurm_command", fake)
    status = query_job("7")
    assert status == JobStatus("PENDING", restarts=2, reason="BeginTime")
    assert status.active and status.describe() == "requeued (2×), pending, BeginTime"

    answers.update(squeue=None, sacct="CANCELLED by 0\n")  # gone from the controller
    assert query_job("7") == JobStatus("CANCELLED", restarts=0)
    answers.update(sacct="")
    assert query_job("7") == JobStatus("UNKNOWN")


def test_a_preempted_job_is_given_time_to_be_requeued(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["PREEMPTED", "PREEMPTED", "PENDING"])
    monkeypatch.setattr(slurm, "query_job", lambda job_id: JobStatus(next(answers)))
    assert slurm.settled_status("7", poll_s=0.0).state == "PENDING"
    monkeypatch.setattr(slurm, "query_job", lambda job_id: JobStatus("PREEMPTED"))
    assert slurm.settled_status("7", settle_s=0.05, poll_s=0.01).state == "PREEMPTED"


def test_status_line_reads_the_last_iteration_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    records = [
        {"type": "iteration", "epoch": 0, "global_iteration": 6, "loss": 2.5},
        {"type": "epoch", "epoch": 1, "global_iteration": 6},
        {"type": "iteration", "epoch": 1, "global_iteration": 8, "loss": 1.23456},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "iter')  # a line being written
    assert read_progress(log)["global_iteration"] == 8
    assert read_progress(tmp_path / "missing.jsonl") is None
    line = status_line("42", JobStatus("RUNNING", restarts=1), read_progress(log), epochs=2)
    assert line == "SLURM job 42: running (requeued 1×) · epoch 2/2 · iteration 8 · loss 1.2346"


def test_apptainer_command_line(config: Config) -> None:
    assert container_python(config) is None
    config.launch.container = "/images/mugs.sif"
    config.launch.container_bind = ["/scratch:/scratch:ro", config.data.root]
    run, prepared, root = config.train.output_dir, config.data.prepared_dir, config.data.root
    assert container_python(config) == (
        f"apptainer exec --bind /scratch:/scratch:ro,{root},{run},{prepared} /images/mugs.sif python"
    )
    config.launch.gpus_per_node = 2
    assert container_python(config).startswith("apptainer exec --nv --bind ")
    # the dataset, unless bound by the user, is bound read-only at its own path
    config.launch.container_bind = []
    assert f"--bind {run},{prepared},{root}:{root}:ro " in container_python(config)
    config.launch.container_runtime = "podman"
    assert f"--volume {root}:{root}:ro " in container_python(config)


def test_sbatch_script(config: Config, tmp_path: Path) -> None:
    launch = config.launch
    launch.partition, launch.gpus_per_node, launch.mem_gb, launch.timeout_min = "gpu", 2, 16, 90
    launch.signal_delay_s, launch.account, launch.sbatch_extra = 45, "proj", {"exclusive": True}
    launch.container = "/images/mugs.sif"
    executor = submitit.SlurmExecutor(folder=tmp_path / "%j", python=container_python(config))
    executor.update_parameters(**sbatch_parameters(config))
    script = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    lines = set(script.splitlines())
    expected = {
        "#SBATCH --job-name=mugs-run",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --mem=16384M",
        "#SBATCH --time=90",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --signal=USR2@45",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
    }
    assert expected <= lines
    assert not any(line.startswith(("#SBATCH --qos", "#SBATCH --constraint")) for line in lines)
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert (
        "apptainer exec --nv --bind " in srun
        and " /images/mugs.sif python -u -m submitit.core._submit" in srun
    )


def test_a_finished_run_returns_at_once(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_slurm(*command: str) -> str:
        raise AssertionError(f"ran {command}")

    monkeypatch.setattr(slurm, "slurm_command", no_slurm)
    run = Path(config.train.output_dir)
    run.mkdir()
    (run / "DONE").write_text('{"global_iteration": 12}\n')
    result = launch_slurm(config, progress=False)
    assert result == TrainResult("finished", 12, run / "checkpoints" / "latest.pt")


def test_reattaches_to_a_live_job_and_resubmits_a_failed_one(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(config.train.output_dir)
    run.slurm.mkdir(parents=True)
    JobRecord("41", str(run.slurm / "41"), 4, "then").save(run)
    states = {"41": "RUNNING"}
    monkeypatch.setattr(slurm, "settled_status", lambda job_id: JobStatus(states[job_id]))
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: PARTITIONS)
    submitted = []

    def fake_submit(
        config: Config, job: object, run: RunDir, job_class: type, earlier: JobRecord | None
    ) -> JobRecord:
        submitted.append(earlier.job_id)
        return JobRecord("42", str(run.slurm / "42"), 4, "now", [earlier.job_id])

    monkeypatch.setattr(slurm, "_submit", fake_submit)
    assert launch_slurm(config, wait=False, progress=False).job_id == "41"
    assert submitted == []

    states["41"] = "FAILED"
    assert launch_slurm(config, wait=False, progress=False).job_id == "42"
    assert submitted == ["41"]


def test_the_job_checkpoints_after_the_iteration_then_requeues(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """USR2 only raises the stop flag; submitit's handler (requeue) runs after the engine has returned."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    events = []
    usr2 = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    previous = signal.signal(usr2, lambda signum, frame: events.append("requeue"))  # submitit's stand-in
    try:
        job = RequeueingJob(config.to_dict())

        def fake_training(config: Config, *, stop_requested, **settings: object) -> TrainResult:
            assert not stop_requested()
            os.kill(os.getpid(), usr2)
            events.append(f"iteration done, stop={stop_requested()}")
            return TrainResult("interrupted", 3, None)

        monkeypatch.setattr(jobs, "run_pretraining", fake_training)
        assert job() == TrainResult("interrupted", 3, None)
        assert events == ["iteration done, stop=True", "requeue"]
        assert job.checkpoint().function is job
    finally:
        signal.signal(usr2, previous)


def test_a_run_directory_in_use_is_refused_before_submitting(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local run holding the run's lock: the SLURM launcher refuses at once, in one line, and submits
    nothing (the job would have been refused inside SLURM, reported as a traceback)."""
    run_dir = Path(config.train.output_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(slurm, "cluster_partitions", lambda: PARTITIONS)
        monkeypatch.setattr(slurm, "_submit", lambda *args: pytest.fail("submitted"))
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} on"):
            launch_slurm(config, progress=False)
    finally:
        holder.kill()
        holder.wait()


HOLD_LOCK = """
import sys, time
from mugs.training.run_lock import exclusive_run
with exclusive_run(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_refusal_inside_the_job_reaches_the_launcher_as_itself(
    config: Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The job returns what the run raised when it refused to start; the launcher raises it, so
    `mugs pretrain` reports it in one line (exit 2), as for a local run."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    refusal = RunLockedError(f"{config.train.output_dir} is in use by pid 7 on elsewhere")

    def refused(config: Config, **settings: object) -> TrainResult:
        raise refusal

    monkeypatch.setattr(jobs, "run_pretraining", refused)
    usr2 = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    previous = signal.getsignal(usr2)
    try:
        assert RequeueingJob(config.to_dict())() is refusal
    finally:
        signal.signal(usr2, previous)

    class FinishedJob:
        def __init__(self, folder: str, job_id: str) -> None:
            pass

        def result(self) -> Exception:
            return refusal

    monkeypatch.setattr(slurm, "query_job", lambda job_id: JobStatus("COMPLETED"))
    monkeypatch.setattr(slurm.submitit, "SlurmJob", FinishedJob)
    with pytest.raises(RunLockedError, match="in use by pid 7"):
        slurm.wait_for_job(JobRecord("5", str(tmp_path), 1, "now"), config)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_waiting_stops_the_launcher_not_the_job(
    config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, stop: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM to `mugs pretrain --launcher slurm` while its job starts: one line, 128 + the
    signal's number, no traceback (Ctrl-C was a KeyboardInterrupt traceback); the job runs on."""
    from mugs.cli import main

    monkeypatch.setattr(slurm, "cluster_partitions", lambda: PARTITIONS)
    monkeypatch.setattr(slurm, "_submit", lambda *args: JobRecord("43", "folder", 4, "now"))
    monkeypatch.setattr(slurm, "query_job", lambda job_id: JobStatus("PENDING"))
    monkeypatch.setattr(slurm, "settled_status", lambda job_id: JobStatus("PENDING"))
    monkeypatch.setattr(slurm, "slurm_command", lambda *command: pytest.fail(f"ran {command}"))
    timer = threading.Timer(0.5, os.kill, (os.getpid(), stop))
    timer.start()
    values = config.to_dict()
    values["launch"]["poll_seconds"] = 60
    config_file = Path(config.train.output_dir).parent / "config.yaml"
    config_file.write_text(yaml.safe_dump(values))
    started = time.monotonic()
    assert main(["pretrain", "--config", str(config_file), "--no-progress"]) == 128 + stop
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"stopped waiting for SLURM job 43 by {stop.name}: the job runs on" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_finetuning_job_gets_its_kind_s_resources_and_its_own_run_directory(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``launch.jobs.finetune`` over ``launch``; the job record, lock and submitit folders live in the
    fine-tuning's run directory (``eval/finetune/`` beside ``eval/finetune.json``), not pretraining's."""
    config.launch.jobs = {"finetune": {"nodes": 1, "tasks_per_node": 4, "timeout_min": 45}}
    checkpoint = tmp_path / "eval" / "selected.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    submitted: dict[str, object] = {}

    class FakeExecutor:
        def __init__(self, folder: Path, **options: object) -> None:
            submitted["folder"] = folder

        def update_parameters(self, **parameters: object) -> None:
            submitted.update(parameters)

        def submit(self, job: RequeueingJob) -> object:
            submitted["job"] = job
            return SimpleNamespace(job_id="77", paths=SimpleNamespace(folder=tmp_path / "77"))

    monkeypatch.setattr(slurm, "cluster_partitions", lambda: PARTITIONS)
    monkeypatch.setattr(slurm.submitit, "SlurmExecutor", FakeExecutor)
    monkeypatch.chdir(tmp_path)
    job = Finetuning("eval/selected.pt", "eval/finetune.json")
    record = launch_slurm(config, job=job, wait=False, progress=False)
    run = RunDir(tmp_path / "eval" / "finetune")
    assert (record.job_id, record.tasks) == ("77", 4) and JobRecord.load(run) == record
    assert submitted["folder"] == run.slurm / "%j" and not Path(config.train.output_dir).exists()
    assert (submitted["nodes"], submitted["ntasks_per_node"], submitted["time"]) == (1, 4, 45)
    assert submitted["job_name"] == "mugs-finetune"
    assert submitted["job"].job == Finetuning(str(checkpoint), str(tmp_path / "eval" / "finetune.json"))
    assert submitted["job"].config_values["launch"]["nodes"] == config.launch.nodes  # the file's own
