"""One writer per run directory: an exclusive lock on ``<run>/.lock`` held while a run trains.

The lock is a POSIX record lock (``fcntl.lockf``) on the open file. The kernel drops it when the
holder exits, however it exits (SIGKILL, a node crash on a local disk), so a stale lock never
blocks a restart. On a shared file system it is cluster-wide where the file system implements
POSIX locks across clients: NFSv4 (and NFSv3 with lockd), Lustre mounted with ``-o flock``, GPFS,
BeeGFS, CephFS. Lustre mounted with ``localflock`` (or ``noflock``) only locks within one node.
After a node crash on NFS, the server frees the lock when the client's lease expires (about 90 s).
The lock file also records who holds it (host, pid, SLURM job, start time), for the message a
second starter gets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mugs.rundir import RunDir


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("slurm_job"):
        parts.append(f"SLURM job {holder['slurm_job']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


@contextmanager
def exclusive_run(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the duration; :class:`RunLockedError` names the holder at once."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = RunDir(run_dir).lock
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunLockedError(
                f"{run_dir} is in use by {describe_holder(lock_path)}: one run directory takes one "
                f"writer (lock file {lock_path}); wait for it, stop it, or use another train.output_dir"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield lock_path
        finally:  # however the run ends, a refused start included
            os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)  # releases the lock
