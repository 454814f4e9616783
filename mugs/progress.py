"""Progress a person can follow in a log file: plain-text lines (no terminal control sequences) with the
position, the rate and the time left, printed every few seconds.

``mugs <command> --progress-every SECONDS`` turns the lines on for that process (the workflow's rules
do, so that SLURM logs and ``tee``'d terminals read the same); :func:`progress_display` then hands the
evaluation code a :class:`PlainProgress` instead of rich's live bar, which only draws on a terminal.
Pretraining's position comes from the ``log.jsonl`` its engine appends to every ``train.log_every``
iterations (:func:`follow_training_log`).
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mugs.config import Config

__all__ = ["PlainProgress", "follow_training_log", "progress_display", "use_plain_lines"]

_plain: dict[str, Any] = {}  # {"interval": seconds, "label": text} once use_plain_lines was called


def use_plain_lines(interval: float, label: str) -> None:
    """From now on, :func:`progress_display` prints a line per task every ``interval`` seconds, each
    starting with ``[label]`` (so that the lines of parallel jobs can be told apart)."""
    _plain.update(interval=interval, label=label)


def progress_display(enabled: bool) -> Progress | PlainProgress:
    """Plain lines when :func:`use_plain_lines` was called; otherwise rich's bar (drawn only when
    ``enabled``)."""
    if _plain:
        return PlainProgress(_plain["interval"], _plain["label"])
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


@dataclass
class _Task:
    description: str
    total: float
    completed: float
    unit: str
    started: float
    # (position, time) of the first move, where the rate is measured from (start-up is not progress),
    # and the time of the latest move: a position read from a log lags, so the rate ends there
    origin: tuple[float, float] | None = None
    moved: float = 0.0
    reported_done: bool = False


class PlainProgress:
    """The part of ``rich.progress.Progress`` the package uses (``add_task``, ``update``, a context
    manager), printing ``[label] description: position/total (percent), rate, time left`` for every
    unfinished task each ``interval`` seconds, and once more when a task completes."""

    def __init__(
        self,
        interval: float,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval, self.label = interval, label
        self.stream = stream or sys.stderr
        self.clock = clock
        self._tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress-lines", daemon=True)

    def __enter__(self) -> PlainProgress:
        self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._ticker.join()

    def add_task(self, description: str, total: float, completed: float = 0, unit: str = "items") -> int:
        with self._lock:
            now = self.clock()
            self._tasks.append(_Task(description, total, completed, unit, now))
            return len(self._tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
    ) -> None:
        with self._lock:
            task = self._tasks[task_id]
            before = task.completed
            if completed is not None:
                task.completed = completed
            if advance is not None:
                task.completed += advance
            if task.completed != before:
                task.moved = self.clock()
                task.origin = task.origin or (task.completed, task.moved)
            if description is not None:
                task.description = description
            if task.completed >= task.total and not task.reported_done:
                task.reported_done = True
                self._print(task_id)

    def line(self, task_id: int) -> str:
        """The progress line of task ``task_id`` now."""
        task, now = self._tasks[task_id], self.clock()
        percent = 100 * task.completed / max(task.total, 1)
        position = f"{task.completed:g}/{task.total:g} {task.unit} ({percent:.0f}%)"
        if task.completed >= task.total:
            return f"[{self.label}] {task.description}: {position}, done in {_duration(now - task.started)}"
        if task.origin is None or task.completed == task.origin[0] or task.moved <= task.origin[1]:
            return f"[{self.label}] {task.description}: {position}, rate not known yet"
        rate = (task.completed - task.origin[0]) / (task.moved - task.origin[1])
        left = max((task.total - task.completed) / rate - (now - task.moved), 0.0)
        return (
            f"[{self.label}] {task.description}: {position}, {rate:.3g} {task.unit}/s, {_duration(left)} left"
        )

    def _print(self, task_id: int) -> None:
        print(self.line(task_id), file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            with self._lock:
                for task_id, task in enumerate(self._tasks):
                    if task.completed < task.total:
                        self._print(task_id)


class _TrainingLogFollower:
    """Reads the run's last ``iteration`` record every second into a :class:`PlainProgress` task."""

    def __init__(self, config: Config) -> None:
        from mugs.training.pretrain import training_dataset

        dataset, _ = training_dataset(config)
        total = config.optim.epochs * (len(dataset) // config.optim.batch_size)
        self.log_file = Path(config.train.output_dir) / "log.jsonl"
        self.display = PlainProgress(_plain["interval"], _plain["label"])
        self.task = self.display.add_task(
            "pretrain",
            total=min(total, config.train.max_iterations or total),
            completed=self._position(),
            unit="iterations",
        )
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._follow, name="training-log", daemon=True)

    def _position(self) -> int:
        from mugs.launch.slurm import read_progress

        record = read_progress(self.log_file)
        return 0 if record is None else int(record["global_iteration"])

    def _follow(self) -> None:
        while not self._stopped.wait(min(1.0, self.display.interval)):
            self.display.update(self.task, completed=self._position())

    def __enter__(self) -> _TrainingLogFollower:
        self.display.__enter__()
        self._reader.start()
        return self

    def close(self) -> None:
        self._stopped.set()
        self._reader.join()
        self.display.__exit__(None, None, None)


def follow_training_log(config: Config) -> _TrainingLogFollower | None:
    """With plain lines on (:func:`use_plain_lines`), start printing pretraining's progress as read from
    ``train.output_dir/log.jsonl``; ``close()`` the returned follower when training ends. ``None``
    when plain lines are off."""
    return _TrainingLogFollower(config).__enter__() if _plain else None
