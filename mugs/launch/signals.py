"""Stopping a local run cleanly on SIGTERM and SIGINT, as SLURM's USR2 does for a job.

The first signal asks the run to stop after the current iteration (all ranks agree on it in the
engine) and write its checkpoint; a second one aborts at once, losing the work since the last
checkpoint. The process then exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM),
as a shell reports a process killed by it, so schedulers and Snakemake see an unfinished job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import types
from collections.abc import Callable, Iterable

from mugs.training.engine import TrainResult

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stopped_by_signal(result: TrainResult) -> tuple[str, int]:
    """The message and exit code (128 + the signal's number) of a run that a signal stopped."""
    received = signal.Signals[result.stopped_by]
    message = (
        f"stopped by {received.name} at global iteration {result.global_iteration}, "
        f"checkpoint {result.checkpoint}: run the same command to resume"
    )
    return message, 128 + int(received)


class StopOnSignals:
    """A stop flag raised by the first of ``signals``; a second aborts the process with that signal.

    ``forward_to`` gives process ids that each signal is passed on to, as SIGTERM (the ranks of a
    multi-process run, which ignore the terminal's SIGINT and stop on SIGTERM). Use it as a context
    manager around the run; call it (no arguments) for the flag.
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = STOP_SIGNALS,
        *,
        forward_to: Callable[[], Iterable[int]] = tuple,
    ) -> None:
        self.signals = tuple(signals)
        self.forward_to = forward_to
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopOnSignals:
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        received = signal.Signals(signum)
        self.forward()
        if self.received is None:
            self.received = received
            _say(f"got {received.name}: stopping after this iteration with a checkpoint (again to abort)")
            return
        _say(f"got {received.name} again: aborting now; the work since the last checkpoint is lost")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def forward(self) -> None:
        """Pass SIGTERM on to the ``forward_to`` processes (a stop that came before they existed)."""
        for pid in self.forward_to():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _say(message: str) -> None:
    # a signal handler may run in the middle of a print: write(2) is the safe way out
    os.write(2, f"\nmugs: {message}\n".encode())
