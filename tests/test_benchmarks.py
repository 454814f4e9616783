"""The benchmark scripts run (tiny, on CPU) and report their figures, so they cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    step = json.loads((tmp_path / "step-vit_tiny-fp32.json").read_text())
    assert step["seconds_per_iteration"] > 0 and step["tflop_per_iteration"] > 0
    assert step["images_per_second"] == pytest.approx(step["batch"] / step["seconds_per_iteration"])
    assert "queries/s" in (tmp_path / "knn.txt").read_text()
