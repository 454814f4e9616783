"""Plain progress lines: position, rate and time left, at the promised interval, without control codes."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from mugs.config import DataConfig
from mugs.data.prepare import run_prepare
from mugs.progress import INTERVAL_VARIABLE, LABEL_VARIABLE, PlainProgress, use_plain_lines
from mugs.testing.configs import tiny_training_config
from mugs.testing.synthetic import SyntheticImages
from mugs.training.pretrain import run_pretraining

INTERVAL_S = 0.2
# a busy 2-core machine may delay a wake-up; a line missing for a whole extra interval is a failure
SLACK_S = INTERVAL_S
LINE = re.compile(
    r"^\[knn mugs\] features train \(teacher\): (\d+)/120 images \(\d+%\), "
    r"(?:[\d.e+]+ images/s, \d+:\d\d:\d\d left|rate not known yet)$"
)


class TimedLines:
    """A stream that records each line with the time it was written."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *complete, self._pending = self._pending.split("\n")
        self.lines += [(time.monotonic(), line) for line in complete]
        return len(text)

    def flush(self) -> None:
        pass


def test_a_line_every_interval_with_position_rate_and_time_left() -> None:
    stream = TimedLines()
    started = time.monotonic()
    with PlainProgress(INTERVAL_S, "knn mugs", stream) as display:
        task = display.add_task("features train (teacher)", total=120, unit="images")
        for done in range(10, 130, 10):
            time.sleep(INTERVAL_S / 2)
            display.update(task, completed=done)
        time.sleep(INTERVAL_S * 2)  # finished tasks print nothing more
    *running, (_, last) = stream.lines
    assert re.fullmatch(
        r"\[knn mugs\] features train \(teacher\): 120/120 images \(100%\), done in 0:00:0\d", last
    )
    assert len(running) >= 3
    positions = []
    for _, line in running:
        match = LINE.match(line)
        assert match, line
        positions.append(int(match[1]))
    assert positions == sorted(positions) and 0 < positions[-1] < 120
    assert "images/s" in running[-1][1]
    times = [started] + [at for at, _ in running]
    assert max(b - a for a, b in itertools.pairwise(times)) <= INTERVAL_S + SLACK_S
    assert not any("\x1b" in line for _, line in stream.lines)


def test_the_rate_runs_from_the_first_move_to_the_latest() -> None:
    now = [1000.0]
    display = PlainProgress(60, "pretrain mugs", TimedLines(), clock=lambda: now[0])
    task = display.add_task("pretrain", total=300, completed=100, unit="iterations")
    now[0] += 30  # start-up: no progress, and not counted in the rate
    display.update(task, completed=150)
    assert display.line(task).endswith("150/300 iterations (50%), rate not known yet")
    now[0] += 50
    display.update(task, completed=250)
    # 100 iterations in 50 s: 2 per second, 50 left → 25 s
    assert (
        display.line(task)
        == "[pretrain mugs] pretrain: 250/300 iterations (83%), 2 iterations/s, 0:00:25 left"
    )
    # a position read from a log lags: the time left keeps counting down between updates
    now[0] += 10
    assert display.line(task).endswith("250/300 iterations (83%), 2 iterations/s, 0:00:15 left")
    now[0] += 60
    assert display.line(task).endswith("0:00:00 left")


def test_pretraining_prints_its_position_per_iteration_not_per_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in (INTERVAL_VARIABLE, LABEL_VARIABLE):  # restored after the test
        monkeypatch.setenv(variable, "")
    use_plain_lines(0.01, "pretrain tiny")
    # log.jsonl is written only at iteration 1000, so positions come from the training loop itself
    config = tiny_training_config(tmp_path, None, "train.log_every=1000")
    dataset = SyntheticImages(size=24, side=20)  # 3 iterations per epoch at batch 8, 2 epochs
    result = run_pretraining(config, dataset=dataset, mean_std=((0.5,) * 3, (0.25,) * 3), progress=False)
    assert result.global_iteration == 6
    lines = capsys.readouterr().err.splitlines()
    positions = [
        int(match[1])
        for line in lines
        if (match := re.match(r"^\[pretrain tiny\] pretrain: (\d)/6 iterations \(\d+%\), ", line))
    ]
    assert any(0 < position < 6 for position in positions), lines
    assert positions == sorted(positions) and positions[-1] == 6, lines
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["type"] for record in records] == ["epoch", "epoch"]


def test_preparation_reports_in_the_same_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in (INTERVAL_VARIABLE, LABEL_VARIABLE):  # restored after the test
        monkeypatch.setenv(variable, "")
    use_plain_lines(60, "prepare")  # no line falls due: each task's completion line alone
    for name in ("cat", "dog"):
        for index in range(3):
            (tmp_path / "data" / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (40 * index, 0, 0)).save(
                tmp_path / "data" / "train" / name / f"{index}.png"
            )
    config = DataConfig(
        source="imagefolder", root=str(tmp_path / "data"), prepared_dir=str(tmp_path / "out"), workers=1
    )
    run_prepare(config, progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"done in \S+$", "done", line) for line in lines if line.startswith("[prepare]")] == [
        "[prepare] scanning: 2/2 class directories (100%), done",
        "[prepare] decoding: 6/6 images (100%), done",
    ], lines
