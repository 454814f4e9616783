"""``python -m mugs`` is the ``mugs`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_python_dash_m_mugs_runs_the_command_line(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "mugs", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and "pretrain" in listed.stdout
    # its exit status is the command's: bad input is one line and exit code 2
    missing = tmp_path / "missing.pt"
    refused = subprocess.run(
        [sys.executable, "-m", "mugs", "export", str(missing), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and str(missing) in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
