"""Checks made once, before any test runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# A full run's temporary runs, checkpoints and DVC caches peak at about 1.5 GB (`make test`, `du` of
# pytest's base directory every 10 s); twice that leaves room for the SLURM cluster's state and logs.
# Out of space, every later test fails in its fixtures with errors that do not say why.
MIN_FREE_GB = float(os.environ.get("MUGS_TEST_MIN_FREE_GB", "3"))


def pytest_sessionstart(session: pytest.Session) -> None:
    basetemp = session.config.option.basetemp
    where = Path(basetemp).resolve().parent if basetemp else Path(tempfile.gettempdir())
    while not where.exists():  # a --basetemp under missing directories: the disk they would be on
        where = where.parent
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < MIN_FREE_GB:
        pytest.exit(
            f"{where} has {free_gb:.1f} GB free; the test suite needs {MIN_FREE_GB:g} GB there "
            "(set TMPDIR or --basetemp to a roomier disk, or MUGS_TEST_MIN_FREE_GB to change the floor)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
