"""Fixtures for tests that run against a real SLURM cluster (tests/cluster/start-slurm.sh).

``MUGS_SLURM_CLUSTER=/path/to/env.sh`` reuses a cluster started by hand; otherwise the session starts
its own under /tmp and stops it at the end. Without the SLURM binaries (or root) the tests are skipped,
unless ``MUGS_REQUIRE_SLURM`` is set (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "sbatch", "sacct", "ip")
# /etc/slurm/slurm.conf can point at one cluster only: sessions that start their own take turns
SESSION_LOCK = Path(tempfile.gettempdir()) / "mugs-slurm-test.lock"
LOCK_WAIT_S = 900
SACCT_FIELDS = ("JobID", "JobName", "Partition", "State", "ExitCode", "NodeList", "AllocNodes", "Elapsed")

log = logging.getLogger(__name__)


@dataclass
class SlurmCluster:
    """A running test cluster: its prefix and the environment (``SLURM_CONF``) its clients need."""

    prefix: Path
    env: dict[str, str]

    def run(self, *command: str) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sacct(self, job_id: str, duplicates: bool = False) -> list[dict[str, str]]:
        """Accounting records of a job and its steps, one dict per line keyed by ``SACCT_FIELDS``.

        ``duplicates`` also lists the earlier runs of a requeued job (``sacct --duplicates``).
        """
        command = ["sacct", "-j", str(job_id), "--parsable2", "--noheader", "-o", ",".join(SACCT_FIELDS)]
        if duplicates:
            command.append("--duplicates")
        lines = self.run(*command).splitlines()
        return [dict(zip(SACCT_FIELDS, line.split("|"), strict=True)) for line in lines]


def _read_env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    return env


def _missing_reason() -> str | None:
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM test cluster needs {', '.join(missing)} (see tests/cluster/README.md)"
    if os.geteuid() != 0:
        return "SLURM test cluster must be started as root (network namespaces, daemons)"
    return None


@contextlib.contextmanager
def _session_lock() -> Iterator[None]:
    with SESSION_LOCK.open("a") as handle:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {SESSION_LOCK} for {LOCK_WAIT_S} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _script_env(prefix: Path) -> dict[str, str]:
    # own ports, bridge subnet and namespace names, so a cluster started by hand with the defaults
    # (or one leaked by a killed session) does not collide with this one
    index = 20 + os.getpid() % 200
    return {
        **os.environ,
        "SLURM_TEST_PREFIX": str(prefix),
        "SLURM_TEST_PORT_BASE": str(17000 + 4 * index),
        "SLURM_TEST_SUBNET": f"10.77.{index}",
        "SLURM_TEST_NS": f"mugs{index}",
    }


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """The session's SLURM cluster: reused from ``MUGS_SLURM_CLUSTER`` or started (and stopped) here."""
    env_sh = os.environ.get("MUGS_SLURM_CLUSTER")
    if env_sh:
        cluster = SlurmCluster(Path(env_sh).parent, {**os.environ, **_read_env_sh(Path(env_sh))})
        if "UP" not in cluster.run("scontrol", "ping"):
            pytest.fail(f"MUGS_SLURM_CLUSTER={env_sh}: slurmctld does not answer")
        yield cluster
        return

    reason = _missing_reason()
    if reason:
        if os.environ.get("MUGS_REQUIRE_SLURM"):
            pytest.fail(f"MUGS_REQUIRE_SLURM is set but {reason}")
        pytest.skip(reason)

    with _session_lock():
        workdir = Path(tempfile.mkdtemp(prefix="mugs-slurm-test-"))
        workdir.chmod(0o755)  # mariadbd runs as user mysql and must reach its data directory
        prefix = workdir / "cluster"
        script_env = _script_env(prefix)
        keep_logs = True
        try:
            started = time.monotonic()
            start = subprocess.run(
                [str(CLUSTER_DIR / "start-slurm.sh")],
                env=script_env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if start.returncode != 0:
                pytest.fail(f"start-slurm.sh failed:\n{start.stderr}")
            log.info("SLURM test cluster up in %.1f s", time.monotonic() - started)
            yield SlurmCluster(prefix, {**os.environ, **_read_env_sh(prefix / "env.sh")})
            keep_logs = request.session.testsfailed > 0
        finally:
            # stop-slurm.sh is idempotent: safe after a failed or timed-out start too
            stopping = time.monotonic()
            stop_env = {**script_env, "SLURM_TEST_KEEP": "1" if keep_logs else "0"}
            subprocess.run(
                [str(CLUSTER_DIR / "stop-slurm.sh")], env=stop_env, capture_output=True, timeout=120
            )
            log.info("SLURM test cluster stopped in %.1f s", time.monotonic() - stopping)
            if keep_logs:
                log.warning("SLURM test cluster logs kept in %s", workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The cluster, with its variables also set in this process (submitit runs sbatch/sacct from it)."""
    for key, value in slurm_cluster.env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    return slurm_cluster
