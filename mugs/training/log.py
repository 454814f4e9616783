"""What a pretraining run reports and watches while it trains: the JSON-lines metrics log, the window
of losses and timings between two log lines, the non-finite-loss and collapse watches with the errors
that end a run."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mugs import distributed
from mugs.files import atomic_write_text
from mugs.losses import GroupLoss
from mugs.model import NetworkOutput
from mugs.monitoring import collapse_warnings, effective_rank, feature_std, normalised_group_entropy


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was written after the last good checkpoint.

    ``iteration`` is the first bad one (0-based, as ``Trainer.global_iteration`` before that step),
    ``losses`` its values; ``checked_after`` the number of iterations run when the check found it.
    """

    def __init__(
        self, epoch: int, iteration: int, losses: dict[str, float], checked_after: int | None = None
    ) -> None:
        self.epoch, self.iteration, self.losses = epoch, iteration, losses
        self.checked_after = checked_after
        found = f"; found after {checked_after} iterations" if checked_after is not None else ""
        super().__init__(
            f"non-finite loss at global iteration {iteration} (epoch {epoch}): {losses}{found}; "
            "the last good checkpoint is left untouched and no log line follows it"
        )

    def __reduce__(self) -> tuple:
        # a rank's error travels to the launcher pickled
        return type(self), (self.epoch, self.iteration, self.losses, self.checked_after)


class CollapseError(RuntimeError):
    """The collapse watch fired with ``train.stop_on_collapse``; the last good checkpoint is kept."""


class NonFiniteWatch:
    """The first iteration whose losses were not all finite, and those losses, kept on the device.

    :meth:`observe` runs every iteration with ``torch.where`` alone, so it costs no host
    synchronisation; the trainer's ``check_finite`` reads :meth:`summary` when a sync is due anyway.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.iteration = torch.zeros((), dtype=torch.long, device=device)
        self.losses = torch.zeros(len(names), device=device)

    def observe(self, iteration: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([losses[name].float() for name in self.names])
        first = ~(self.seen | torch.isfinite(values).all())
        self.iteration = torch.where(first, iteration, self.iteration)
        self.losses = torch.where(first, values, self.losses)
        self.seen = self.seen | first

    def summary(self) -> torch.Tensor:
        """``[seen, iteration, *losses]`` as float64 (exact for any iteration count), to gather over ranks."""
        return torch.cat((torch.stack((self.seen.double(), self.iteration.double())), self.losses.double()))

    def check(self, iterations_per_epoch: int, *, checked_after: int) -> None:
        """Raise :class:`NonFiniteLossError` for the first bad iteration over all ranks, if any (a
        collective, and it reads the device)."""
        rows = distributed.all_gather_cat(self.summary()[None]).tolist()
        bad = [row for row in rows if row[0]]
        if not bad:
            return
        _, iteration, *values = min(bad, key=lambda row: row[1])
        iteration = int(iteration)
        raise NonFiniteLossError(
            iteration // iterations_per_epoch,
            iteration,
            dict(zip(self.names, values, strict=True)),
            checked_after=checked_after,
        )


@torch.no_grad()
def collapse_watch(
    teacher: NetworkOutput, group_loss: GroupLoss | None, epoch: int, *, dim: int
) -> dict[str, Any]:
    """The collapse signals of the teacher's outputs (std of its normalised CLS features, effective
    rank, normalised group entropy), the group loss's teacher temperature, and the ``warnings`` they
    raise (:func:`mugs.monitoring.collapse_warnings`)."""
    cls = teacher.cls.float()
    signals: dict[str, Any] = {"teacher_feature_std": feature_std(cls), "effective_rank": effective_rank(cls)}
    if teacher.group is not None and group_loss is not None:
        probabilities = group_loss.teacher_probabilities(teacher.group.float(), epoch)
        signals["group_entropy_ratio"] = normalised_group_entropy(probabilities)
    if group_loss is not None:
        signals["teacher_temperature"] = group_loss.teacher_temperature(epoch)
    signals["warnings"] = collapse_warnings(
        signals["teacher_feature_std"],
        signals.get("group_entropy_ratio"),
        signals["effective_rank"],
        dim=dim,
        n_samples=cls.shape[0],
    )
    return signals


def collapse_alarm(messages: list[str], global_iteration: int, *, announce: bool, stop: bool) -> None:
    """Warn of each collapse-watch message (when ``announce``); with ``stop``
    (``train.stop_on_collapse``), any message ends the run with :class:`CollapseError`."""
    for message in messages:
        if announce:
            warnings.warn(f"collapse watch at iteration {global_iteration}: {message}", stacklevel=3)
    if messages and stop:
        raise CollapseError(
            f"collapse detected at global iteration {global_iteration}: {'; '.join(messages)}"
            "; the last good checkpoint is kept"
        )


class LogWindow:
    """Accumulates losses on device and times between log lines; reads them on the host only at log time.

    Its sums and counts are part of a checkpoint (:meth:`state`, :meth:`restore`), so that a run
    resumed between two log lines writes the records of an uninterrupted run; its timings are not.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()
        self.waited = 0.0
        self._wait_from = self.started

    def data_wait_start(self) -> None:
        self._wait_from = time.perf_counter()

    def data_ready(self) -> None:
        self.waited += time.perf_counter() - self._wait_from

    def step_done(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.images += images // max(distributed.world_size(), 1)

    def state(self) -> dict[str, Any]:
        """This rank's loss sums (on the CPU) and counts since the last log line."""
        return {
            "sums": {name: value.detach().cpu() for name, value in self.sums.items()},
            "steps": self.steps,
            "images": self.images,
        }

    def restore(self, state: dict[str, Any], device: torch.device) -> None:
        """Continue from a :meth:`state`; the clock starts now."""
        self.reset()
        self.sums = {name: value.to(device) for name, value in state["sums"].items()}
        self.steps, self.images = state["steps"], state["images"]

    def mean_losses(self) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        stacked = torch.stack([self.sums[n] for n in names]) / self.steps
        stacked = distributed.all_reduce_mean(stacked)
        return dict(zip(names, stacked.tolist(), strict=True))

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def data_wait_fraction(self) -> float:
        return self.waited / max(time.perf_counter() - self.started, 1e-9)


class MetricsLog:
    """JSON lines, one per log interval and per epoch; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` pairs. A torn last line (a crash or a full disk in mid-write) is left out
        with a warning naming the file; an unreadable line before it is an error."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                if number < len(lines):
                    raise ValueError(f"{self.path}, line {number}: not a log record ({error})") from None
                warnings.warn(f"{self.path}: dropped its torn last line {number} ({error})", stacklevel=2)
                continue
            parsed.append((line, record))
        return parsed

    def truncate_after(self, global_iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, r in self.records() if r.get("global_iteration", 0) <= global_iteration]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def has_epoch(self, epoch: int) -> bool:
        return any(r.get("type") == "epoch" and r.get("epoch") == epoch for _, r in self.records())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
