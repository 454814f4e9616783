"""Reliability on the path users run: every stochastic feature of the published presets on (drop path,
weak/strong views, RandAugment, random erasing, several local crops), one and two ranks, loader
workers or none. A run that is stopped, killed at any moment or signalled, then restarted until it
finishes, ends with exactly the files of an uninterrupted run: every tensor of ``latest.pt`` and of
every kept checkpoint (optimizer and RNG states included), ``DONE`` and the log.

The runs are processes of :mod:`mugs.testing.faults`, forked from one pre-imported server so that
each costs its training time rather than torch's import.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mugs.files import atomic_write_text
from mugs.rundir import RunDir
from mugs.testing.compare import assert_same_checkpoint, assert_same_finetuning, assert_same_run, log_records
from mugs.testing.faults import finetune_reliability_config
from mugs.testing.finetuning import prepare_tiny_split, pretrained_checkpoint
from mugs.training import checkpoint as ckpt
from mugs.training.log import MetricsLog

FAULTS = [sys.executable, "-m", "mugs.testing.faults"]
REPO = Path(__file__).resolve().parents[1]


class Server:
    """Runs of :mod:`mugs.testing.faults`, one at a time, forked by ``mugs.testing.faults --serve``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        self.process = subprocess.Popen(
            [*FAULTS, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )

    def start(self, run_dir: Path, *args: str) -> int:
        self.count += 1
        self.stdout, self.stderr = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"argv": [str(run_dir), *args], "stdout": str(self.stdout), "stderr": str(self.stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["pid"]

    def wait(self) -> int:
        return json.loads(self.process.stdout.readline())["returncode"]

    def run(self, run_dir: Path, *args: str) -> int:
        self.start(run_dir, *args)
        return self.wait()

    def finish(self, run_dir: Path, *args: str, attempts: int = 4) -> None:
        """Restart the run until it finishes."""
        for _ in range(attempts):
            if self.run(run_dir, *args) == 0:
                return
        raise AssertionError(f"{run_dir} did not finish: {self.stderr.read_text()[-2000:]}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    server = Server(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(server: Server, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted run, and its training time in seconds."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert server.run(run_dir) == 0, server.stderr.read_text()
    return run_dir, json.loads(server.stdout.read_text())["seconds"]


def test_same_seed_gives_identical_files(server: Server, reference, tmp_path: Path) -> None:
    assert server.run(tmp_path / "run") == 0
    assert_same_run(tmp_path / "run", reference[0])
    latest = ckpt.load_checkpoint(RunDir(tmp_path / "run").latest)
    assert latest["config"]["model"]["drop_path_rate"] == 0.1
    assert latest["config"]["augment"]["rand_augment"].startswith("rand-m9")


@pytest.mark.parametrize("workers", [0, 2])
def test_stopping_and_resuming_is_exact(server: Server, reference, tmp_path: Path, workers: int) -> None:
    """Stopped inside the second epoch, then resumed, with or without loader processes: the same files
    as the uninterrupted run (which had none)."""
    run_dir, loader = tmp_path / "run", f"train.num_workers={workers}"
    assert server.run(run_dir, "--set", loader, "--set", "train.max_iterations=4") == 0
    stopped = ckpt.load_checkpoint(RunDir(run_dir).latest)
    assert (stopped["global_iteration"], stopped["iteration_in_epoch"]) == (4, 1)
    assert server.run(run_dir, "--set", loader) == 0
    assert_same_run(run_dir, reference[0])


def test_a_checkpoint_without_a_log_window_still_resumes(server: Server, reference, tmp_path: Path) -> None:
    """Checkpoints written before the log window was kept resume with an empty window: the same
    checkpoints, only the first log line after the stop averages fewer iterations."""
    run_dir = tmp_path / "run"
    assert server.run(run_dir, "--set", "train.max_iterations=4") == 0
    latest = RunDir(run_dir).latest
    payload = ckpt.load_checkpoint(latest)
    assert payload.pop("log_window")[0]["steps"] == 1  # iteration 4, after the line at 3
    ckpt.atomic_save(payload, latest)
    assert server.run(run_dir) == 0, server.stderr.read_text()
    for path in sorted(RunDir(reference[0]).checkpoints.iterdir()):
        assert_same_checkpoint(RunDir(run_dir).checkpoints / path.name, path)
    resumed = {r["global_iteration"]: r for r in log_records(run_dir) if r["type"] == "iteration"}
    expected = {r["global_iteration"]: r for r in log_records(reference[0]) if r["type"] == "iteration"}
    assert resumed[6]["loss"] != expected[6]["loss"] and resumed[9] == expected[9]


DEVICE_BACKEND = "augment.backend=device"


@pytest.fixture(scope="module")
def device_reference(server: Server, tmp_path_factory) -> Path:
    """An uninterrupted run whose views are rendered by the device backend (here on the CPU)."""
    run_dir = tmp_path_factory.mktemp("device-reference") / "run"
    assert server.run(run_dir, "--set", DEVICE_BACKEND) == 0, server.stderr.read_text()
    return run_dir


def test_the_device_backend_gives_identical_files_for_the_same_seed(
    server: Server, device_reference: Path, tmp_path: Path
) -> None:
    assert server.run(tmp_path / "run", "--set", DEVICE_BACKEND) == 0
    assert_same_run(tmp_path / "run", device_reference)
    latest = ckpt.load_checkpoint(RunDir(device_reference).latest)
    assert latest["config"]["augment"]["backend"] == "device"


@pytest.mark.parametrize("workers", [0, 2])
def test_stopping_and_resuming_the_device_backend_is_exact(
    server: Server, device_reference: Path, tmp_path: Path, workers: int
) -> None:
    run_dir, settings = tmp_path / "run", ["--set", DEVICE_BACKEND, "--set", f"train.num_workers={workers}"]
    assert server.run(run_dir, *settings, "--set", "train.max_iterations=4") == 0
    assert server.run(run_dir, *settings) == 0
    assert_same_run(run_dir, device_reference)


# each point with the occurrence to kill at: latest.pt is written at iterations 2, 3 (epoch end),
# 4, 6, 6 (epoch end), 8 and 9 (the last epoch end); kept copies after each epoch
NAMED_KILLS = [
    "startup:1",
    "checkpoint-write:1",
    "checkpoint-write:5",
    "checkpoint-rename:2",
    "checkpoint-rename:7",
    "keep:1",
    "keep:3",
    "keep-rename:2",
    "log-write:5",
    "done:1",
]


@pytest.mark.parametrize("point", NAMED_KILLS)
def test_sigkill_at_a_named_point(server: Server, reference, tmp_path: Path, point: str) -> None:
    run_dir = tmp_path / "run"
    assert server.run(run_dir, "--kill-at", point) == -signal.SIGKILL
    if point.startswith("keep:") or point.startswith("done"):
        assert not (run_dir / "DONE").exists()
    server.finish(run_dir)
    if point.startswith("log-write"):
        assert "dropped its torn last line" in server.stderr.read_text()
    assert_same_run(run_dir, reference[0])


def _iterations_done(run_dir: Path) -> int:
    latest = RunDir(run_dir).latest
    return ckpt.load_checkpoint(latest)["global_iteration"] if latest.exists() else 0


def test_sigkill_at_random_moments(server: Server, reference, tmp_path: Path) -> None:
    """Twelve seeded moments, two kills in each of six runs (the second in the resumed process).

    Each moment is drawn over the time the process still has to train: the fastest uninterrupted run's
    time, scaled by the share of iterations its checkpoint leaves. A draw over the whole run's time
    would often fall after a resumed process had already finished, or after any run on a machine that
    got faster than during the reference run, and kill nothing."""
    assert server.run(tmp_path / "timing") == 0
    seconds = min(reference[1], json.loads(server.stdout.read_text())["seconds"])
    total = _iterations_done(reference[0])
    draw = random.Random(13)
    kills = 0
    for trial in range(6):
        run_dir = tmp_path / f"run{trial}"
        for _ in range(2):
            if (run_dir / "DONE").exists():  # a finished run has no moment left to kill it at
                break
            left = seconds * (total - _iterations_done(run_dir)) / total
            returncode = server.run(run_dir, "--kill-after", f"{draw.uniform(0.0, left):.3f}")
            kills += returncode == -signal.SIGKILL
        server.finish(run_dir)
        assert_same_run(run_dir, reference[0])
    print(f"SIGKILL at {kills} of 12 random moments; every run identical")
    assert kills >= 10


def _wait_for_iteration(run_dir: Path, iteration: int, timeout: float = 120.0) -> None:
    """Wait for a log record at ``iteration`` or later (one comes every 3 iterations)."""
    deadline = time.monotonic() + timeout
    log = run_dir / "log.jsonl"
    while time.monotonic() < deadline:
        if (
            log.exists()
            and max((r["global_iteration"] for r in log_records(run_dir)), default=0) >= iteration
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} did not reach iteration {iteration}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_cleanly_with_a_checkpoint(
    server: Server, reference, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    run_dir = tmp_path / "run"
    pid = server.start(run_dir, "--step-delay", "0.3")
    _wait_for_iteration(run_dir, 2)
    os.kill(pid, stop_signal)
    assert server.wait() == 128 + stop_signal
    stopped = ckpt.load_checkpoint(RunDir(run_dir).latest)["global_iteration"]
    message = server.stderr.read_text()
    assert f"stopped by {stop_signal.name} at global iteration {stopped}," in message
    assert "Traceback" not in message and 2 <= stopped < 9 and stopped % 3, "stopped on a log line"
    assert max(r["global_iteration"] for r in log_records(run_dir)) <= stopped
    server.finish(run_dir)
    assert_same_run(run_dir, reference[0])


def test_a_second_signal_aborts_at_once(server: Server, reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid = server.start(run_dir, "--step-delay", "0.5")
    _wait_for_iteration(run_dir, 1)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.1)
    os.kill(pid, signal.SIGTERM)
    assert server.wait() == -signal.SIGTERM
    assert "aborting now" in server.stderr.read_text()
    server.finish(run_dir)
    assert_same_run(run_dir, reference[0])


def _spawn(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*FAULTS, str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def _run_two_ranks(run_dir: Path, *args: str) -> None:
    process = _spawn(run_dir, "--nprocs", "2", *args)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two-ranks") / "run"
    _run_two_ranks(run_dir)
    return run_dir


def _stop_two_ranks(run_dir: Path, send: Callable[[subprocess.Popen], None], name: str) -> int:
    process = _spawn(run_dir, "--nprocs", "2", "--step-delay", "0.3", "--set", "train.num_workers=1")
    _wait_for_iteration(run_dir, _iterations_done(run_dir) + 2)
    send(process)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.Signals[name], err
    stopped = ckpt.load_checkpoint(RunDir(run_dir).latest)["global_iteration"]
    assert f"stopped by {name} at global iteration {stopped}," in err and "Traceback" not in err
    assert stopped % 3, "stopped on a log line: the resumed log would not test the log window"
    return stopped


def test_two_ranks_stop_cleanly_on_ctrl_c_and_on_sigterm_and_resume_exactly(
    two_rank_reference: Path, tmp_path: Path
) -> None:
    """Ctrl-C reaches the launcher, both ranks and their loader processes: one clean stop, not an
    abort. SIGTERM reaches the launcher alone, which passes it on. Then the run resumes exactly."""
    run_dir = tmp_path / "run"
    first = _stop_two_ranks(run_dir, lambda process: os.killpg(process.pid, signal.SIGINT), "SIGINT")
    second = _stop_two_ranks(run_dir, lambda process: process.send_signal(signal.SIGTERM), "SIGTERM")
    assert first < second < 9
    _run_two_ranks(run_dir)
    assert_same_run(run_dir, two_rank_reference)


def test_two_ranks_of_the_device_backend_stop_and_resume_exactly(tmp_path: Path) -> None:
    """Each rank draws its own views' parameters in its loader process and renders them itself: stopped
    inside the second epoch and resumed, the two ranks end with the files of an uninterrupted run."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    backend = ("--set", DEVICE_BACKEND, "--set", "train.num_workers=1")
    _run_two_ranks(reference, *backend)
    _run_two_ranks(run_dir, *backend, "--set", "train.max_iterations=4")
    stopped = ckpt.load_checkpoint(RunDir(run_dir).latest)
    assert (stopped["global_iteration"], stopped["iteration_in_epoch"]) == (4, 1)
    _run_two_ranks(run_dir, *backend)
    assert_same_run(run_dir, reference)
    assert ckpt.load_checkpoint(RunDir(reference).latest)["config"]["augment"]["backend"] == "device"


def test_a_second_start_is_refused_while_the_first_runs(server: Server, reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _spawn(run_dir, "--step-delay", "1.0")
    _wait_for_iteration(run_dir, 1)
    assert server.run(run_dir) == 2
    err = server.stderr.read_text()
    assert f"in use by pid {first.pid} on" in err and "Traceback" not in err
    assert str(RunDir(run_dir).lock) in err
    assert first.poll() is None, "the second start must not disturb the first"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_same_run(run_dir, reference[0])


def _wait_for_lock(run_dir: Path, timeout: float = 300.0) -> None:
    """Wait until a launcher holds the run's lock (its holder is written into the lock file)."""
    deadline = time.monotonic() + timeout
    lock = RunDir(run_dir).lock
    while not (lock.exists() and lock.stat().st_size):
        assert time.monotonic() < deadline, f"{lock} was not taken"
        time.sleep(0.05)


def test_a_second_two_rank_start_is_refused_at_once(server: Server, tmp_path: Path) -> None:
    """The launcher takes the lock for its ranks before it spawns them: one line, exit 2, no rank started
    (the ranks used to start, and the refusal came after 63-94 s in a nested traceback)."""
    run_dir = tmp_path / "run"
    first = server.start(run_dir, "--step-delay", "10")  # still training when the second has started
    _wait_for_lock(run_dir)
    started = time.monotonic()
    second = _spawn(run_dir, "--nprocs", "2")
    _, err = second.communicate(timeout=120)
    refused_after = time.monotonic() - started
    assert second.returncode == 2, err
    assert f"in use by pid {first} on" in err and str(RunDir(run_dir).lock) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    print(f"a 2-rank start refused after {refused_after:.1f} s (the process's imports included)")
    assert refused_after < 60
    os.kill(first, signal.SIGTERM)
    assert server.wait() == 128 + signal.SIGTERM


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_two_ranks_stopped_while_starting_stop_as_one_rank_does(tmp_path: Path, name: str) -> None:
    """A stop while the ranks import and set up (before the first checkpoint): the ranks take it once
    their handler is in place, so the run stops after its first iteration with a checkpoint, the line
    and exit code of a 1-rank run; no rank is killed with a traceback. SIGTERM goes to the launcher,
    SIGINT to the whole process group (Ctrl-C)."""
    run_dir = tmp_path / "run"
    process = _spawn(run_dir, "--nprocs", "2")
    _wait_for_lock(run_dir)  # the launcher holds it, its ranks are about to start
    time.sleep(0.5)
    assert not RunDir(run_dir).checkpoints.exists()
    if name == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.Signals[name], err
    assert f"stopped by {name} at global iteration 1," in err and "Traceback" not in err, err
    assert _iterations_done(run_dir) == 1


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_a_refused_resume_leaves_the_run_directory_as_it_was(
    server: Server, reference, tmp_path: Path
) -> None:
    """Other result settings, or a checkpoint whose config has a key this version does not know: exit 2
    naming the keys, and not a byte of the run directory changed (config.yaml used to record the
    refused settings, which describe no checkpoint in it)."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(reference[0]), str(run_dir)], check=True)
    (run_dir / "DONE").unlink()
    before = _files(run_dir)
    assert server.run(run_dir, "--set", "optim.lr=0.5", "--set", "optim.epochs=2") == 2
    message = server.stderr.read_text()
    assert "different configuration (optim.epochs, optim.lr)" in message and "Traceback" not in message
    assert _files(run_dir) == before

    latest = RunDir(run_dir).latest
    payload = ckpt.load_checkpoint(latest)
    payload["config"]["model"]["from_a_later_version"] = 1
    ckpt.atomic_save(payload, latest)
    before = _files(run_dir)
    assert server.run(run_dir) == 2
    message = server.stderr.read_text()
    assert "model.from_a_later_version" in message and "Traceback" not in message
    assert _files(run_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_refused_before_the_run_directory_is_made(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = ["--set", f"train.output_dir={run_dir}", "--set", "train.device=cuda"]
    done = subprocess.run(
        [sys.executable, "-m", "mugs", "pretrain", "--preset", "demo", "--no-progress", *settings],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert "train.device is 'cuda' but no CUDA device is visible" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not run_dir.exists()


def test_a_kept_checkpoint_lost_for_good_blocks_done(server: Server, reference, tmp_path: Path) -> None:
    """A missing last kept copy is rebuilt from latest.pt; an earlier one cannot be, and DONE waits."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(reference[0]), str(run_dir)], check=True)
    (run_dir / "DONE").unlink()
    RunDir(run_dir).kept(3).unlink()
    assert server.run(run_dir) == 0
    assert_same_run(run_dir, reference[0])

    (run_dir / "DONE").unlink()
    RunDir(run_dir).kept(1).unlink()
    assert server.run(run_dir) == 2
    message = server.stderr.read_text()
    assert "epoch0001.pt" in message and "cannot be rebuilt" in message and "Traceback" not in message
    assert not (run_dir / "DONE").exists()


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "log.jsonl", enabled=True)
    log.write({"type": "iteration", "global_iteration": 1})
    log.write({"type": "iteration", "global_iteration": 2})
    with log.path.open("a") as handle:
        handle.write('{"type": "iteration", "global_it')
    with pytest.warns(UserWarning, match=str(log.path)):
        log.truncate_after(2)
    assert [r["global_iteration"] for _, r in log.records()] == [1, 2]

    log.path.write_text('{"type": "iteration", "glo\n{"type": "epoch", "global_iteration": 3}\n')
    with pytest.raises(ValueError, match=rf"{log.path}, line 1"):
        log.truncate_after(3)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_get_the_permissions_of_any_file_the_user_writes(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        run = RunDir(tmp_path)
        latest = ckpt.atomic_save({"format": ckpt.FORMAT}, run.latest)
        kept = ckpt.keep_checkpoint(run, 1)
        text = atomic_write_text(run.done, "{}\n")
    finally:
        os.umask(previous)
    for path in (latest, kept, text):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# ---------------------------------------------------------------------------------------- fine-tuning
# The same promises for fine-tuning, through the same launcher and fault process (``--finetune``):
# drop path, Mixup/CutMix, RandAugment and erasing on; 6 iterations (3 epochs of 2), the state saved
# every 2 iterations and at each epoch end.


@pytest.fixture(scope="module")
def finetuning(server: Server, tmp_path_factory) -> tuple[list[str], Path, float]:
    """The fault process's arguments for a fine-tuning run of a tiny pretrained checkpoint, and an
    uninterrupted run's directory and time."""
    directory = tmp_path_factory.mktemp("finetuning")
    prepared = prepare_tiny_split(directory)
    checkpoint = pretrained_checkpoint(
        directory / "pretrained.pt", finetune_reliability_config("model.depth=2")
    )
    args = ["--finetune", str(checkpoint), "--set", f"data.prepared_dir={prepared}"]
    reference = directory / "reference"
    assert server.run(reference, *args) == 0, server.stderr.read_text()
    assert json.loads(Path(f"{reference}.json").read_text())["best_epoch"] >= 1
    return args, reference, json.loads(server.stdout.read_text())["seconds"]


def _finetuned_iterations(run_dir: Path) -> int:
    latest = RunDir(run_dir).latest
    return ckpt.load_checkpoint(latest)["global_iteration"] if latest.exists() else 0


def test_finetuning_killed_at_random_moments_ends_as_an_uninterrupted_run(
    server: Server, finetuning, tmp_path: Path
) -> None:
    """Eight seeded moments, two kills in each of four runs, each drawn over the time left to train
    (under load a run may finish before a late moment: at least five must kill one)."""
    args, reference, seconds = finetuning
    draw, kills = random.Random(25), 0
    for trial in range(4):
        run_dir = tmp_path / f"run{trial}"
        for _ in range(2):
            left = seconds * (6 - _finetuned_iterations(run_dir)) / 6
            returncode = server.run(run_dir, *args, "--kill-after", f"{draw.uniform(0.0, left):.3f}")
            kills += returncode == -signal.SIGKILL
        server.finish(run_dir, *args)
        assert_same_finetuning(run_dir, reference)
    print(f"SIGKILL at {kills} of 8 random moments; every fine-tuning run identical")
    assert kills >= 5


def test_finetuning_stops_on_sigterm_with_a_checkpoint_and_resumes_exactly(
    server: Server, finetuning, tmp_path: Path
) -> None:
    args, reference, _ = finetuning
    run_dir = tmp_path / "run"
    pid = server.start(run_dir, *args, "--step-delay", "0.5")
    deadline = time.monotonic() + 120
    while not RunDir(run_dir).latest.exists():  # the first save, at iteration 2
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    assert server.wait() == 128 + signal.SIGTERM
    stopped = _finetuned_iterations(run_dir)
    message = server.stderr.read_text()
    assert f"stopped by SIGTERM at global iteration {stopped}," in message and "Traceback" not in message
    assert 2 <= stopped < 6 and not Path(f"{run_dir}.json").exists()
    server.finish(run_dir, *args)
    assert_same_finetuning(run_dir, reference)


def test_two_rank_finetuning_stopped_and_resumed_ends_as_an_uninterrupted_one(
    finetuning, tmp_path: Path
) -> None:
    """Two local ranks (DDP over gloo), each with its own drop-path and Mixup streams: stopped by
    SIGTERM in the middle and resumed, they end with the uninterrupted two-rank run's state and metrics."""
    args = [*finetuning[0], "--set", "train.num_workers=1"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    _run_two_ranks(reference, *args)
    process = _spawn(run_dir, "--nprocs", "2", *args, "--step-delay", "0.5")
    deadline = time.monotonic() + 300
    while not RunDir(run_dir).latest.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert len(ckpt.load_checkpoint(RunDir(run_dir).latest)["rng"]) == 2
    _run_two_ranks(run_dir, *args)
    assert_same_finetuning(run_dir, reference)
