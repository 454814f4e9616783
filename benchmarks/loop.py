"""Where the pretraining loop's wall time goes: data, forward, backward, optimizer, EMA and memories, rest.

    python benchmarks/loop.py                        # the target setting below, 2 threads
    python benchmarks/loop.py --demo                 # the demo preset: 28/14 px crops, batch 32
    python benchmarks/loop.py --num-workers 1 --json loop.json
    python benchmarks/loop.py --set model.depth=1 --iters 3   # any config key, as `mugs --set`
    python benchmarks/loop.py --backend device --jpegs 256 --num-workers 2

Default setting (the speed target): vit_small, batch 4, 2 × 224 px teacher crops and 2 × 224 + 2 × 96 px
student crops, InfoNCE queues and neighbour memories of 1024, group_out_dim 4096, on the CPU with 2
threads and the augmentation in the training process (``--num-workers 0``, as the CPU demo runs); at
most 10 % of the wall time may go outside forward, backward and optimizer step.

The loop is the engine's own ``Trainer.fit`` with its real loader and augmentation, on
``SyntheticImages`` (random RGB images of ``--image-side`` px: no JPEG decoding, which
``benchmarks/augment.py`` times), or with ``--jpegs N`` on N prepared 500×375 JPEGs, cycled.
``--backend`` is ``augment.backend``: with ``device`` the loader only decodes and draws parameters, and
the views are rendered on the device inside the 'data' phase. The phases are measured by wrapping, from
here, the calls the engine already makes, so the engine carries no timing code and the figures are of
the code that trains:

    data            waiting for the loader's next batch (with 0 workers: the augmentation itself), and
                    finishing its crops on the device (the device backend's rendering, erasing,
                    normalisation)
    forward         teacher and student networks and the losses (with the queue writes they make)
    backward        the backward pass
    optimizer       gradient clipping, last-layer freezing and the AdamW step
    ema + memories  the teacher's EMA update and the neighbour-memory writes
    other           the rest of the wall time: schedules, loss
                    bookkeeping, the non-finite watch, log lines (every ``--log-every`` iterations),
                    the progress bar, the stop check

The first ``--warmup`` iterations are run but not counted, and no checkpoint is written.
On CUDA every wrapped call is bracketed by device synchronisations so that its GPU time lands in its
own phase; that removes the overlap of host and device the loop normally has, so there the figures
say where device time goes, and 'other' is host time that would otherwise partly hide behind it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from _common import add_device_arguments, machine_info, report, synchronize
from augment import Cycled, jpeg_dataset
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from mugs.config import Config, config_from_dict, merge_values
from mugs.testing.synthetic import SyntheticImages
from mugs.training import engine
from mugs.training.engine import Trainer

TARGET_SETTING: dict[str, Any] = {
    "model": {"arch": "vit_small", "group_out_dim": 4096},
    "loss": {"instance_queue_size": 1024, "local_group_queue_size": 1024},
    "augment": {"global_size": 224, "local_size": 96, "n_local": 2},
    "optim": {"batch_size": 4},
}
DEMO_SETTING: dict[str, Any] = {"preset": "demo"}
PHASES = {
    "data": "loader, finishing the crops",
    "forward": "teacher, student, losses",
    "backward": "backward pass",
    "optimizer": "clipping, freezing, AdamW",
    "ema_memories": "teacher EMA, memory writes",
    "other": "schedules, bookkeeping, logging",
}
COMPUTE = ("forward", "backward", "optimizer")
TARGET_OUTSIDE = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", action="store_true", help="the demo preset instead of the target setting")
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes (train.num_workers)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (at least 1)")
    parser.add_argument("--log-every", type=int, default=10, help="iterations between log lines")
    parser.add_argument("--image-side", type=int, help="synthetic image side (default 256, demo 28)")
    parser.add_argument("--jpegs", type=int, help="train on this many prepared JPEGs instead")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "device"), help="augment.backend")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (mugs pretrain shows one)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    add_device_arguments(parser, threads=2)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be at least 1 (the first batch starts the loader)")
    return args


def loop_config(args: argparse.Namespace, output_dir: Path) -> Config:
    """The setting, run for warmup + iters iterations without intermediate checkpoints."""
    run = {
        "train": {
            "output_dir": str(output_dir),
            "device": args.device,
            "threads": args.threads,
            "num_workers": args.num_workers,
            "log_every": args.log_every,
            "checkpoint_every": 0,
            "max_iterations": args.warmup + args.iters,
        },
        "augment": {"backend": args.backend},
        # only pretraining runs here; keep the linear-probe setting valid for shallow models
        "evaluate": {"linear_n_last_blocks": 1},
    }
    setting = DEMO_SETTING if args.demo else TARGET_SETTING
    return config_from_dict(merge_values(setting, run), args.overrides)


class PhaseClock:
    """Seconds per phase, counted once :meth:`start` has been called (after the warm-up)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.started: float | None = None
        self.stopped: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None and self.stopped is None:
            synchronize(self.device)
            self.stopped = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        if self.started is not None and self.stopped is None:
            self.seconds[phase] += seconds

    def timed(self, phase: str, function: Callable) -> Callable:
        """``function``, its time (device time too, on CUDA) added to ``phase``."""

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.add(phase, time.perf_counter() - begin)

        return timed

    def figures(self) -> dict[str, float]:
        wall = self.stopped - self.started
        seconds = {**self.seconds, "other": wall - sum(self.seconds.values())}
        return {"wall": wall, **seconds}


class TimedLoader:
    """The trainer's loader, timing each wait for a batch; the clock starts at batch ``warmup``."""

    def __init__(self, loader: DataLoader, clock: PhaseClock, warmup: int) -> None:
        self.loader, self.clock, self.warmup = loader, clock, warmup

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        index = 0
        while True:
            if index == self.warmup:
                self.clock.start()
            begin = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.clock.add("data", time.perf_counter() - begin)
            index += 1
            yield batch


def instrument(trainer: Trainer, clock: PhaseClock, warmup: int, stack: ExitStack) -> None:
    """Wrap the engine's calls into the clock's phases; ``stack`` undoes the class-level patches."""
    trainer.loader = TimedLoader(trainer.loader, clock, warmup)
    trainer.finish_crops = clock.timed("data", trainer.finish_crops)
    trainer.teacher_forward = clock.timed("forward", trainer.teacher_forward)
    trainer.student_ddp = clock.timed("forward", trainer.student_ddp)
    for loss in trainer.objective.losses.values():
        loss.forward = clock.timed("forward", loss.forward)
    stack.enter_context(
        mock.patch.object(torch.Tensor, "backward", clock.timed("backward", torch.Tensor.backward))
    )
    for name in ("clip_gradients_per_tensor", "cancel_last_layer_gradients"):
        stack.enter_context(mock.patch.object(engine, name, clock.timed("optimizer", getattr(engine, name))))
    trainer.optimizer.step = clock.timed("optimizer", trainer.optimizer.step)
    for name in ("ema_update", "update_memories"):
        timed = clock.timed("ema_memories", getattr(engine, name))
        stack.enter_context(mock.patch.object(engine, name, timed))

    def save() -> None:
        # no checkpoint is written; the one after the last iteration ends the timed window
        if trainer.global_iteration == trainer.config.train.max_iterations:
            clock.stop()

    trainer.save = save


def phase_table(seconds: dict[str, float], iterations: int) -> Table:
    table = Table(title="Where the loop's wall time goes")
    for column in ("phase", "what", "ms / iteration", "share"):
        table.add_column(column, justify="left" if column in ("phase", "what") else "right")
    wall = seconds["wall"]
    for phase, what in PHASES.items():
        share = seconds[phase] / wall
        table.add_row(phase, what, f"{1000 * seconds[phase] / iterations:.1f}", f"{share:.1%}")
    table.add_row("wall", "", f"{1000 * wall / iterations:.1f}", "100%", style="bold")
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        config = loop_config(args, Path(scratch))
        batch = config.optim.batch_size
        side = args.image_side or (28 if args.demo else 256)
        # one epoch longer than the run: no epoch-end checkpoint inside the timed window
        length = batch * (args.warmup + args.iters + 1)
        if args.jpegs:
            pool, mean_std, source = jpeg_dataset(Path(scratch), args.jpegs)
            dataset = Cycled(pool, length)
        else:
            dataset, mean_std = SyntheticImages(size=length, side=side), ((0.5,) * 3, (0.25,) * 3)
            source = f"random {side}x{side} RGB images"
        trainer = Trainer(config, dataset, mean_std=mean_std)
        clock = PhaseClock(trainer.device)
        with ExitStack() as stack:
            instrument(trainer, clock, args.warmup, stack)
            result = trainer.fit(progress=not args.no_progress)
        assert result.global_iteration == args.warmup + args.iters and clock.stopped is not None
        device = trainer.device
        # the loader's persistent workers ignore SIGTERM; left running (the instrumented trainer is
        # never freed before exit), multiprocessing's exit handler would wait on them forever
        workers = trainer.loader.loader._iterator  # a DataLoader has no public shutdown
        if workers is not None:
            workers._shutdown_workers()
    seconds = clock.figures()
    outside = 1 - sum(seconds[p] for p in COMPUTE) / seconds["wall"]
    Console().print(phase_table(seconds, args.iters))
    figures: dict[str, Any] = {
        "setting": "demo" if args.demo else "target",
        "arch": config.model.arch,
        "depth": config.model.depth,
        "batch": batch,
        "crops": f"4x{config.augment.global_size} + {config.augment.n_local}x{config.augment.local_size}",
        "image_side": None if args.jpegs else side,
        "source": source,
        "backend": config.augment.backend,
        "num_workers": args.num_workers,
        "threads": args.threads,
        "iterations": args.iters,
        "seconds_per_iteration": seconds["wall"] / args.iters,
        "images_per_second": batch * args.iters / seconds["wall"],
        **{f"{phase}_fraction": seconds[phase] / seconds["wall"] for phase in PHASES},
        "outside_forward_backward_optimizer": outside,
        "target_outside_at_most": TARGET_OUTSIDE,
        "target_met": outside <= TARGET_OUTSIDE,
        **machine_info(device),
    }
    report("Mugs pretraining loop", figures, args.json)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
