"""Progress a person can follow in a log file: plain-text lines (no terminal control sequences) with the
position, the rate and the time left, printed every few seconds.

``mugs <command> --progress-every SECONDS`` turns the lines on for that process and the processes it
starts (the workflow's rules do, so that SLURM logs and ``tee``'d terminals read the same);
:func:`progress_display`, the one progress factory of the package, then hands out a
:class:`PlainProgress` instead of rich's live bar, which only draws on a terminal.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

# rich draws from Python's global RNG when first imported: at import time (the training engine imports
# this module), before any seeding, so that the draw can never fall between restoring a checkpoint's
# RNG states and the next step
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["PlainProgress", "progress_display", "use_plain_lines"]

# the settings live in the environment so that the ranks a launcher spawns and the SLURM jobs it
# submits (both inherit it) print the lines too
INTERVAL_VARIABLE = "MUGS_PROGRESS_EVERY"
LABEL_VARIABLE = "MUGS_PROGRESS_LABEL"


def use_plain_lines(interval: float, label: str) -> None:
    """From now on, :func:`progress_display` here and in the processes started from here prints a line
    per task every ``interval`` seconds, each starting with ``[label]`` (so that the lines of parallel
    jobs can be told apart)."""
    os.environ.update({INTERVAL_VARIABLE: str(interval), LABEL_VARIABLE: label})


def progress_display(enabled: bool, *, main_process: bool = True) -> Progress | PlainProgress:
    """Plain lines when :func:`use_plain_lines` was called (whatever ``enabled``: they are for logs);
    otherwise rich's bar on standard error (standard output is for results), drawn only when
    ``enabled``. Tasks take a ``unit`` (``add_task(..., unit=)``)
    that the plain lines name. ``main_process=False`` (the other ranks of a distributed run) shows
    nothing."""
    if main_process and LABEL_VARIABLE in os.environ:
        return PlainProgress(float(os.environ[INTERVAL_VARIABLE]), os.environ[LABEL_VARIABLE])
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not (enabled and main_process),
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
    """The part of ``rich.progress.Progress`` the package uses (``add_task``, ``update``, ``advance``,
    a context manager), printing ``[label] description: position/total (percent), rate, time left`` for every
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

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

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
