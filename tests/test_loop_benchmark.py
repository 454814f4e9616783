"""benchmarks/loop.py runs the real training loop (tiny, on CPU) and accounts for all of its wall time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer", "ema_memories", "other")


def test_loop_benchmark_splits_the_wall_time_into_phases(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    tiny = ["model.arch=vit_tiny", "model.depth=1", "augment.global_size=32", "augment.local_size=16"]
    command = [sys.executable, "benchmarks/loop.py", "--iters", "2", "--warmup", "1", "--log-every", "1"]
    command += ["--image-side", "40", "--threads", "1", "--no-progress", "--json", str(out)]
    command += [arg for override in tiny for arg in ("--set", override)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Where the loop's wall time goes" in done.stdout

    figures = json.loads(out.read_text())
    assert (figures["setting"], figures["arch"], figures["depth"], figures["batch"]) == (
        "target",
        "vit_tiny",
        1,
        4,
    )
    assert figures["crops"] == "4x32 + 2x16" and figures["iterations"] == 2
    fractions = {phase: figures[f"{phase}_fraction"] for phase in PHASES}
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert all(fractions[phase] > 0 for phase in ("data", "forward", "backward", "optimizer", "ema_memories"))
    assert fractions["other"] >= 0
    compute = fractions["forward"] + fractions["backward"] + fractions["optimizer"]
    assert figures["outside_forward_backward_optimizer"] == pytest.approx(1 - compute)
    assert figures["target_met"] == (figures["outside_forward_backward_optimizer"] <= 0.10)
    assert figures["images_per_second"] == pytest.approx(4 / figures["seconds_per_iteration"])


def test_loop_benchmark_demo_preset_settings() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from loop import loop_config, parse_args
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    config = loop_config(parse_args(["--demo", "--iters", "3", "--warmup", "2"]), Path("scratch"))
    assert (config.model.arch, config.model.depth, config.optim.batch_size) == ("vit_tiny", 6, 32)
    assert (config.augment.global_size, config.augment.local_size, config.augment.n_local) == (28, 14, 2)
    assert (config.train.max_iterations, config.train.checkpoint_every, config.train.num_workers) == (5, 0, 0)
    target = loop_config(parse_args([]), Path("scratch"))
    assert (target.model.arch, target.model.group_out_dim, target.optim.batch_size) == ("vit_small", 4096, 4)
    assert (target.loss.instance_queue_size, target.loss.local_group_queue_size) == (1024, 1024)
    assert (target.augment.global_size, target.augment.local_size, target.augment.n_local) == (224, 96, 2)
    assert target.train.threads == 2
