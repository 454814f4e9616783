"""SLURM launcher: the whole run as one checkpointable submitit job that survives preemption and time limits.

``launch_slurm`` checks everything it can before submitting, records the job id in the run directory so
that a second launcher reattaches instead of submitting again, and waits with a status line. The job
(:class:`RequeueingJob`) joins one process group over all its tasks and trains until SLURM's signal; then
it finishes the iteration, writes ``latest.pt`` and requeues itself, and the restarted job resumes there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit
from rich.console import Console

from mugs.config import Config, ConfigError, config_from_dict, for_job, merge_values
from mugs.files import atomic_write_text
from mugs.launch.distributed_env import slurm_process_group
from mugs.launch.jobs import LongJob, Pretraining
from mugs.launch.local import backend_for
from mugs.rundir import RunDir
from mugs.training.checkpoint import MissingCheckpointError
from mugs.training.engine import CollapseError, NonFiniteLossError, TrainResult
from mugs.training.run_lock import RunLockedError, exclusive_run

# a job in one of these states may still run: a launcher reattaches to it rather than submitting another
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESIZING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "SPECIAL_EXIT",
        "RESV_DEL_HOLD",
    }
)
# a preempted job that is requeued turns PENDING within seconds; one that stays PREEMPTED was cancelled
PREEMPTED_SETTLE_S = 60.0


# what a run raises when it refuses to start or stops on its own, which `mugs pretrain` reports in one line
REFUSALS = (ValueError, RunLockedError, MissingCheckpointError, NonFiniteLossError, CollapseError)


class PreflightError(ValueError):
    """The run cannot be submitted as configured; the message lists every problem. Nothing was submitted."""


class SlurmJobError(RuntimeError):
    """The SLURM job ended without finishing the run (failed, cancelled, out of time-outs, ...)."""


class StoppedWaiting(Exception):
    """The launcher was stopped (SIGINT, SIGTERM) while it waited; the job runs on, to reattach to."""

    def __init__(self, job_id: str, received: signal.Signals) -> None:
        self.job_id, self.received = job_id, received
        super().__init__(
            f"stopped waiting for SLURM job {job_id} by {received.name}: the job runs on; run the same "
            f"command to reattach to it (scancel {job_id} stops it)"
        )


# ---------------------------------------------------------------------------------------------- the job
class RequeueingJob:
    """The submitit job: every task is one rank of a long job (:mod:`mugs.launch.jobs`, pretraining
    unless told); checkpointable.

    submitit's own handler of the preemption signal (USR2) would checkpoint and requeue at once, in the
    middle of an iteration. This job takes the signal over: the handler only raises the stop flag, which
    the job checks after every iteration (agreed over all ranks), then writes ``latest.pt``. Only then
    is submitit's handler called, on every rank: on rank 0 it calls :meth:`checkpoint`, requeues the job
    and exits, counting time-outs against ``max_num_timeout``; on the other ranks it does nothing.
    """

    def __init__(self, config_values: dict[str, Any], job: LongJob | None = None) -> None:
        self.config_values = config_values
        self.job = Pretraining() if job is None else job
        self._signalled = False

    def __call__(self) -> TrainResult | Exception:
        env = submitit.JobEnvironment()
        config = config_from_dict(self.config_values)
        self._signalled = False
        usr_signal = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        requeue = signal.getsignal(usr_signal)  # installed by submitit before it called us
        signal.signal(usr_signal, self._on_signal)
        try:
            with slurm_process_group(env, backend_for(config.train.device)):
                result = self.job(config, stop_requested=self.stop_requested, progress=False, locked=False)
        except REFUSALS as error:
            # the job's result, so that the launcher raises it as a local run does, in one line; as an
            # exception here it would reach the launcher as a traceback inside submitit's error
            return error
        if result.status == "interrupted" and callable(requeue):
            requeue(usr_signal, None)
        return result

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Resubmit this job unchanged: the job resumes from ``latest.pt`` by itself."""
        return submitit.helpers.DelayedSubmission(self)

    def stop_requested(self) -> bool:
        """Polled by the engine after every iteration."""
        return self._signalled

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self._signalled = True
        # os.write, not print: a handler that prints can interrupt a print and raise "reentrant call"
        os.write(2, f"mugs: got {signal.Signals(signum).name}: checkpoint after this iteration\n".encode())


# ------------------------------------------------------------------------------------ SLURM commands
def slurm_command(*command: str) -> str:
    """Run a SLURM client command; its stdout, or :class:`SlurmJobError` naming the command."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmJobError(f"{command[0]} not found: run this on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmJobError(f"{shlex.join(command)} did not answer within 60 s") from None
    if done.returncode != 0:
        raise SlurmJobError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Partition:
    name: str
    nodes: int
    max_gpus_per_node: int
    default: bool = False


def parse_gpu_count(gres: str) -> int:
    """GPUs per node in a ``sinfo %G`` field.

    ``gpu:2`` → 2, ``gpu:a100:4(S:0-1),shard:8`` → 4, ``(null)`` → 0.
    """
    count = 0
    for entry in gres.split(","):
        parts = entry.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            count += int(parts[-1])
    return count


def parse_partitions(sinfo_output: str) -> dict[str, Partition]:
    """Partitions from ``sinfo -h -o '%P|%D|%G'`` (one line per partition and node group)."""
    partitions: dict[str, Partition] = {}
    for line in sinfo_output.splitlines():
        if not line.strip():
            continue
        name, nodes, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        part = partitions.setdefault(name, Partition(name, 0, 0, default))
        part.nodes += int(nodes)
        part.max_gpus_per_node = max(part.max_gpus_per_node, parse_gpu_count(gres))
    return partitions


def cluster_partitions() -> dict[str, Partition]:
    return parse_partitions(slurm_command("sinfo", "-h", "-o", "%P|%D|%G"))


@dataclass
class JobStatus:
    state: str  # SLURM's state name, "UNKNOWN" when neither squeue nor sacct knows the job
    restarts: int = 0  # times the job was requeued
    reason: str = ""  # why a pending job waits

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def describe(self) -> str:
        if self.restarts and self.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
            text = f"requeued ({self.restarts}×), pending"
        else:
            text = self.state.lower() + (f" (requeued {self.restarts}×)" if self.restarts else "")
        return text + (f", {self.reason}" if self.state == "PENDING" and self.reason else "")


def query_job(job_id: str) -> JobStatus:
    """The job's state: squeue while the controller knows it (no lag), else the accounting's last record."""
    try:
        live = slurm_command("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r").split("\n")
    except SlurmJobError:  # squeue rejects ids that have left the controller
        live = []
    try:
        runs = slurm_command("sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "-o", "State").split(
            "\n"
        )
    except SlurmJobError:
        runs = []
    live, runs = [line for line in live if line.strip()], [line for line in runs if line.strip()]
    restarts = max(len(runs) - 1, 0)
    if live:
        state, _, reason = live[0].partition("|")
        return JobStatus(state, restarts, "" if reason == "None" else reason)
    if runs:
        return JobStatus(runs[-1].split()[0], restarts)  # "CANCELLED by 0" → CANCELLED
    return JobStatus("UNKNOWN")


def settled_status(job_id: str, *, settle_s: float = PREEMPTED_SETTLE_S, poll_s: float = 2.0) -> JobStatus:
    """``query_job``, but a job seen PREEMPTED is given ``settle_s`` to be requeued before that counts."""
    status = query_job(job_id)
    deadline = time.monotonic() + settle_s
    while status.state == "PREEMPTED" and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = query_job(job_id)
    return status


# ------------------------------------------------------------------------------------- pre-flight
def with_absolute_paths(config: Config) -> Config:
    """A copy with the run's paths absolute, so that a job started elsewhere finds the same files.

    It is not validated again here: the pre-flight checks report an invalid config with the rest.
    """
    config = copy.deepcopy(config)
    config.train.output_dir = str(Path(config.train.output_dir).absolute())
    config.data.prepared_dir = str(Path(config.data.prepared_dir).absolute())
    config.data.root = str(Path(config.data.root).absolute())
    for section, key in (("train", "init_from"), ("launch", "container")):
        value = getattr(getattr(config, section), key)
        if value is not None and "://" not in value and Path(value).exists():
            setattr(getattr(config, section), key, str(Path(value).absolute()))
    return config


def _writable_problem(directory: Path) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        return f"output directory {directory} (train.output_dir) is not writable: {error.strerror or error}"
    return None


def _data_problems(config: Config) -> list[str]:
    prepared = Path(config.data.prepared_dir)
    missing = [
        name
        for name in ("summary.json", "manifest-train.jsonl", "stats.json")
        if not (prepared / name).is_file()
    ]
    if missing:
        return [
            f"prepared data missing in {prepared} (data.prepared_dir): no {', '.join(missing)}; "
            "run `mugs prepare` first"
        ]
    root = Path(json.loads((prepared / "summary.json").read_text())["root"])
    if not root.is_dir():
        return [f"the dataset directory {root} that {prepared} was prepared from does not exist"]
    return []


def preflight_problems(
    config: Config, partitions: dict[str, Partition] | None, job: LongJob | None = None
) -> list[str]:
    """Everything that would make the submitted job fail or wait forever; empty when it may be submitted.

    ``partitions`` is the cluster's (``cluster_partitions()``); ``None`` when ``sinfo`` failed. The
    resources checked are those of ``job``'s kind (pretraining unless told, ``config.for_job``).
    """
    job = Pretraining() if job is None else job
    launch = for_job(config, job.kind).launch
    problems = []
    try:
        # the job's shape is checked with the rest of the values, as a SLURM run's (whatever launcher
        # the file names: this is the SLURM launcher)
        config_from_dict(merge_values(config.to_dict(), {"launch": {"launcher": "slurm"}}))
    except ConfigError as error:
        problems.append(f"the configuration does not validate: {error}")
    try:  # pretraining's own check is one of the config's rules, reported above
        if job.kind != Pretraining.kind:
            job.check(config, launch.nodes * launch.tasks_per_node)
    except ValueError as error:
        problems.append(str(error))
    problems += _data_problems(config)
    if partitions is None:
        problems.append("sinfo failed: cannot check the partition (is this a SLURM login node?)")
    else:
        problems += _partition_problems(launch, partitions)
    container = launch.container
    is_image_file = launch.container_runtime == "apptainer" and "://" not in (container or "")
    if container is not None and is_image_file and not Path(container).is_file():
        problems.append(f"container image {container} (launch.container) does not exist")
    writable = _writable_problem(job.run_dir(config))
    if writable:
        problems.append(writable)
    return problems


def preflight_warnings(config: Config) -> list[str]:
    """Settings that let the job run, but badly: printed before submitting, not refused."""
    launch = config.launch
    if launch.gpus_per_node and config.train.num_workers == "auto" and launch.cpus_per_task is None:
        return [
            "launch.cpus_per_task is not set, so each GPU rank gets the partition's default CPUs (often "
            "1) and train.num_workers=auto gives it that many loader processes less one: the paper's "
            "multi-crop augmentation would starve the GPU. Set launch.cpus_per_task (16 per GPU keeps "
            "up best, docs/benchmarks.md) or train.num_workers."
        ]
    return []


def _partition_problems(launch: Any, partitions: dict[str, Partition]) -> list[str]:
    if launch.partition is None:
        defaults = [p for p in partitions.values() if p.default]
        if not defaults:
            return ["launch.partition is not set and the cluster has no default partition"]
        part = defaults[0]
    elif launch.partition not in partitions:
        return [
            f"partition {launch.partition!r} (launch.partition) does not exist; "
            f"partitions: {', '.join(sorted(partitions))}"
        ]
    else:
        part = partitions[launch.partition]
    problems = []
    if launch.nodes > part.nodes:
        problems.append(f"launch.nodes={launch.nodes} but partition {part.name!r} has {part.nodes} nodes")
    if launch.gpus_per_node > part.max_gpus_per_node:
        has = (
            f"at most {part.max_gpus_per_node} GPUs per node" if part.max_gpus_per_node else "no GPUs (GRES)"
        )
        problems.append(f"launch.gpus_per_node={launch.gpus_per_node} but partition {part.name!r} has {has}")
    return problems


def check_before_submit(config: Config, partitions: dict[str, Partition] | None, job: LongJob) -> None:
    problems = preflight_problems(config, partitions, job)
    if problems:
        raise PreflightError(
            "not submitted, the pre-flight checks found:\n" + "\n".join(f"- {p}" for p in problems)
        )


# ------------------------------------------------------------------------------------- submission
def container_python(config: Config, job: LongJob | None = None) -> str | None:
    """submitit's ``python``: the image's ``python``, run by ``launch.container_runtime`` on every node.

    The run's output, prepared data and (read-only) dataset directories are bound at their own paths
    besides ``launch.container_bind``, so every node sees the same paths; GPUs are passed when the job
    asks for them.
    apptainer: ``apptainer exec [--nv] --bind DIRS IMAGE python``. podman shares nothing with the job by
    default: ``podman run`` gets the job's network and hostname (the ranks' rendezvous), shared memory, its
    SLURM, submitit and MUGS variables, the binds and the submitting directory, which the job runs in.
    """
    launch = config.launch
    if launch.container is None:
        return None
    binds = list(launch.container_bind)
    job = Pretraining() if job is None else job
    # the dataset read-only: the job reads it in place and never writes beside it
    for directory, bind in (
        (str(job.run_dir(config)), str(job.run_dir(config))),
        (config.data.prepared_dir, config.data.prepared_dir),
        (config.data.root, f"{config.data.root}:{config.data.root}:ro"),
    ):
        if not any(b.split(":")[0] == directory for b in binds):
            binds.append(bind)
    gpus = launch.gpus_per_node > 0
    if launch.container_runtime == "apptainer":
        command = ["apptainer", "exec", *(["--nv"] if gpus else []), "--bind", ",".join(binds)]
    else:
        shared = ["--network", "host", "--uts", "host", "--ipc", "host"]
        variables = ["SLURM_*", "SUBMITIT_*", "MUGS_*", *(["CUDA_VISIBLE_DEVICES"] if gpus else [])]
        command = ["podman", "run", "--rm", *shared, *(["--device", "nvidia.com/gpu=all"] if gpus else [])]
        command += [option for variable in variables for option in ("--env", variable)]
        # the submitting directory too, as Apptainer binds it by default
        command += [option for bind in [*binds, os.getcwd()] for option in ("--volume", _podman_volume(bind))]
        command += ["--workdir", os.getcwd()]
    return shlex.join([*command, *launch.container_options, launch.container, "python"])


def _podman_volume(bind: str) -> str:
    """A bind ``SRC[:DEST[:OPTS]]`` as podman's ``--volume``, which needs both paths absolute."""
    source, _, rest = bind.partition(":")
    destination, _, options = rest.partition(":")
    volume = f"{Path(source).absolute()}:{Path(destination or source).absolute()}"
    return f"{volume}:{options}" if options else volume


def sbatch_parameters(config: Config) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments for the run's job."""
    launch = config.launch
    parameters: dict[str, Any] = {
        "job_name": f"mugs-{Path(config.train.output_dir).name}",
        "nodes": launch.nodes,
        "ntasks_per_node": launch.tasks_per_node,
        "time": launch.timeout_min,
        "signal_delay_s": launch.signal_delay_s,
        # the job requeues itself on the signal; clusters with JobRequeue=0 allow that only with --requeue
        "additional_parameters": {"requeue": True, **launch.sbatch_extra},
    }
    optional = {
        "gpus_per_node": launch.gpus_per_node or None,
        "cpus_per_task": launch.cpus_per_task,
        "mem": f"{round(launch.mem_gb * 1024)}M" if launch.mem_gb else None,
        "partition": launch.partition,
        "account": launch.account,
        "qos": launch.qos,
        "constraint": launch.constraint,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    return parameters


@dataclass
class JobRecord:
    """What ``<output_dir>/slurm/job.json`` keeps of the run's job: enough to reattach to it."""

    job_id: str
    folder: str  # submitit's folder of this job (pickles, logs)
    tasks: int
    submitted_at: str
    earlier_job_ids: list[str] = field(default_factory=list)

    @staticmethod
    def load(run: RunDir) -> JobRecord | None:
        path = run.slurm_record
        return JobRecord(**json.loads(path.read_text())) if path.exists() else None

    def save(self, run: RunDir) -> None:
        atomic_write_text(run.slurm_record, json.dumps(dataclasses.asdict(self), indent=1) + "\n")


def decide(status: JobStatus | None, finished: bool) -> Literal["attach", "finished", "submit"]:
    """What a launcher does with a run directory whose recorded job has ``status`` (``None``: no record).

    A job that may still run is reattached to, never submitted twice; a finished run returns at once;
    anything else (no job yet, failed, cancelled, out of time-outs) is submitted and resumes from
    ``latest.pt``.
    """
    if status is not None and status.active:
        return "attach"
    return "finished" if finished else "submit"


def recorded_active_job(run_dir: Path) -> str | None:
    """The id of the run's recorded SLURM job if it may still be running, else None (no SLURM call
    is made when the run has no job record)."""
    record = JobRecord.load(RunDir(run_dir))
    if record is None:
        return None
    return record.job_id if settled_status(record.job_id).active else None


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    # two launchers started together must not both decide to submit
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finished_result(run: RunDir) -> TrainResult:
    done = json.loads(run.done.read_text())
    return TrainResult("finished", done["global_iteration"], run.latest)


def launch_slurm(
    config: Config,
    *,
    wait: bool = True,
    progress: bool = True,
    job: LongJob | None = None,
    job_class: Callable[[dict[str, Any], LongJob], RequeueingJob] = RequeueingJob,
) -> TrainResult | JobRecord:
    """Run ``job`` (pretraining unless told) as one SLURM job with the resources of its kind
    (``config.for_job``), or reattach to the job of its run directory; wait for it unless ``wait=False``.

    Returns the job's :class:`TrainResult` (or, without waiting, the :class:`JobRecord`). Raises
    :class:`PreflightError` before submitting anything that cannot run, and :class:`SlurmJobError` when
    the job ends unfinished (starting the launcher again then resubmits and resumes). ``job_class``
    builds the submitit job from the config's plain values and ``job``.
    """
    console = Console(stderr=True)
    config = with_absolute_paths(config)
    job = (Pretraining() if job is None else job).absolute()
    run = RunDir(job.run_dir(config))
    run_dir = run.root
    try:
        run.slurm.mkdir(parents=True, exist_ok=True)
    except OSError:
        check_before_submit(config, _partitions_or_none(), job)  # names the unwritable directory, and more
        raise
    with _exclusive(run.launch_lock):
        record = JobRecord.load(run)
        status = settled_status(record.job_id) if record else None
        action = decide(status, run.done.exists())
        if action == "finished":
            console.print(f"{run_dir} has finished already")
            return _finished_result(run)
        if action == "attach":
            console.print(f"reattaching to SLURM job {record.job_id} ({status.describe()}) of {run_dir}")
        else:
            check_before_submit(config, _partitions_or_none(), job)
            with exclusive_run(run_dir):  # a run that holds it (a local one) is refused now, in one line
                pass
            for warning in preflight_warnings(for_job(config, job.kind)):
                console.print(f"[yellow]warning:[/yellow] {warning}")
            if record is not None:
                console.print(
                    f"SLURM job {record.job_id} ended {status.state}: resubmitting, resuming from latest.pt"
                )
            record = _submit(config, job, run, job_class, record)
            console.print(f"submitted SLURM job {record.job_id} for {run_dir}")
    if not wait:
        return record
    return _wait_or_stop(record, for_job(config, job.kind), console if progress else None)


def _wait_or_stop(record: JobRecord, config: Config, console: Console | None) -> TrainResult:
    """:func:`wait_for_job`; SIGINT or SIGTERM stops the waiting at once (:class:`StoppedWaiting`), never
    the job."""

    def stop(signum: int, frame: types.FrameType | None) -> None:
        raise StoppedWaiting(record.job_id, signal.Signals(signum))

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return wait_for_job(record, config, console)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _partitions_or_none() -> dict[str, Partition] | None:
    try:
        return cluster_partitions()
    except SlurmJobError:
        return None


def _submit(
    config: Config,
    job: LongJob,
    run: RunDir,
    job_class: Callable[[dict[str, Any], LongJob], RequeueingJob],
    earlier: JobRecord | None,
) -> JobRecord:
    resources = for_job(config, job.kind)
    executor = submitit.SlurmExecutor(
        folder=run.slurm / "%j",
        max_num_timeout=resources.launch.max_num_timeout,
        python=container_python(resources, job),
    )
    executor.update_parameters(**sbatch_parameters(resources))
    if job.kind != Pretraining.kind:
        executor.update_parameters(job_name=f"mugs-{job.kind}")
    submitted = executor.submit(job_class(config.to_dict(), job))
    record = JobRecord(
        job_id=str(submitted.job_id),
        folder=str(submitted.paths.folder),
        tasks=resources.launch.nodes * resources.launch.tasks_per_node,
        submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        earlier_job_ids=[*earlier.earlier_job_ids, earlier.job_id] if earlier else [],
    )
    record.save(run)
    return record


# ------------------------------------------------------------------------------------------ waiting
def read_progress(log_file: Path) -> dict[str, Any] | None:
    """The last ``iteration`` record of the run's ``log.jsonl`` (only its tail is read), or ``None``."""
    try:
        with log_file.open("rb") as handle:
            handle.seek(max(handle.seek(0, os.SEEK_END) - 16384, 0))
            lines = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("type") == "iteration":
                return record
    return None


def status_line(job_id: str, status: JobStatus, record: dict[str, Any] | None, epochs: int) -> str:
    text = f"SLURM job {job_id}: {status.describe()}"
    if record is not None:
        text += (
            f" · epoch {record['epoch'] + 1}/{epochs} · iteration {record['global_iteration']}"
            f" · loss {record['loss']:.4f}"
        )
    return text


def wait_for_job(record: JobRecord, config: Config, console: Console | None = None) -> TrainResult:
    """Poll the job every ``launch.poll_seconds`` until it ends, showing its state on ``console``; its
    rank 0 result."""
    log_file = RunDir(config.train.output_dir).log
    status = query_job(record.job_id)
    first_line = status_line(record.job_id, status, None, config.optim.epochs)
    with console.status(first_line) if console else contextlib.nullcontext() as display:
        while status.active or status.state == "UNKNOWN":  # UNKNOWN: the controller does not answer
            if display is not None:
                progress = read_progress(log_file)
                display.update(status_line(record.job_id, status, progress, config.optim.epochs))
            time.sleep(config.launch.poll_seconds)
            status = settled_status(record.job_id)
    stderr = Path(record.folder) / f"{record.job_id}_0_log.err"
    if status.state == "COMPLETED":
        job = submitit.SlurmJob(folder=record.folder, job_id=record.job_id)
        try:
            result = job.result()
        except Exception as error:  # submitit re-raises the job's exception
            raise SlurmJobError(f"SLURM job {record.job_id} completed without a result: {error}") from None
        if isinstance(result, Exception):  # the run refused to start, or stopped on its own
            raise result
        return result
    tail = stderr.read_text(errors="replace")[-3000:] if stderr.exists() else "(no log)"
    raise SlurmJobError(
        f"SLURM job {record.job_id} ended {status.state}; starting the launcher again resubmits it and "
        f"resumes from the last checkpoint. End of {stderr}:\n{tail}"
    )
