"""The suite refuses to start on a disk it would fill, and says where and how much is free."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _pytest(basetemp: Path, min_free_gb: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MUGS_TEST_MIN_FREE_GB": min_free_gb}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--basetemp",
            str(basetemp),
            str(TESTS / "test_result_keys.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_too_little_free_space_stops_the_suite_before_any_test(tmp_path: Path) -> None:
    # under a directory that does not exist yet: the check measures the disk it would be on
    run = _pytest(tmp_path / "missing" / "bt", "1e9")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert f"{tmp_path} has " in run.stdout
    assert "needs 1e+09 GB" in run.stdout
    assert " passed" not in run.stdout


def test_enough_free_space_lets_the_suite_run(tmp_path: Path) -> None:
    run = _pytest(tmp_path / "bt", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout
