"""A pretraining or fine-tuning process for fault-injection tests, killed on demand at a named point or
after a delay.

``python -m mugs.testing.faults RUN_DIR [--kill-at POINT:N] [--kill-after S] [--nprocs N] [--set K=V]``
trains :func:`reliability_config` (the tiny configuration with every stochastic and distributed
feature the published presets use) on synthetic images, through the local launcher as ``mugs
pretrain`` does, so its signal handling, lock and exit codes are the real ones. It prints one JSON
line (status, iteration, training seconds) and exits as ``mugs pretrain`` would. With
``--finetune CHECKPOINT`` it fine-tunes that checkpoint instead (:func:`finetune_reliability_config`,
the prepared data given with ``--set data.prepared_dir=…``), its state in RUN_DIR and its metrics in
``RUN_DIR.json``, as ``mugs finetune`` does.

Named points (``POINT:N`` kills at the N-th time the process reaches POINT, with SIGKILL):

- ``startup``: the run directory is locked and its config written, nothing trained yet;
- ``checkpoint-write``: half of ``latest.pt``'s temporary file is written;
- ``checkpoint-rename``: the temporary file is complete, not yet renamed to ``latest.pt``;
- ``keep``: ``latest.pt`` of an epoch end is written, its kept copy not yet made;
- ``keep-rename``: the kept copy's link exists under its temporary name;
- ``log-write``: half of a ``log.jsonl`` record is written (a torn line);
- ``done``: the last checkpoint is written, ``DONE`` not yet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from mugs.config import Config
from mugs.rundir import LATEST
from mugs.testing.configs import tiny_training_config
from mugs.testing.synthetic import SyntheticImages

MEAN_STD = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
POINTS = ("startup", "checkpoint-write", "checkpoint-rename", "keep", "keep-rename", "log-write", "done")


def reliability_dataset() -> SyntheticImages:
    return SyntheticImages(size=24, side=20)  # 3 iterations per epoch at batch 8


def reliability_config(output_dir: str | Path, *overrides: str) -> Config:
    """The tiny configuration with what the published presets switch on and the demo off: drop path,
    weak/strong views with RandAugment and random erasing, several local crops; checkpoints every 2
    iterations and every epoch kept, so that kills land between many writes; a log line every 3
    iterations, so that most stops fall between two log lines."""
    return tiny_training_config(
        output_dir,
        {
            "augment": {"n_local": 3, "weak_prob": 0.5, "erasing_prob": 0.5},
            "optim": {"epochs": 3},
            "train": {"checkpoint_every": 2, "log_every": 3, "keep_every_epochs": 1},
            "model": {"drop_path_rate": 0.1, "depth": 2},
            "evaluate": {"linear_n_last_blocks": 1},
        },
        *overrides,
    )


def finetune_reliability_config(*overrides: str) -> Config:
    """The tiny configuration with what the published fine-tuning recipes switch on: drop path,
    Mixup and CutMix, RandAugment and random erasing; its state saved every 2 iterations (of 6)."""
    return tiny_training_config(
        "unused",
        {
            "finetune": {
                "epochs": 3,
                "batch_size": 8,
                "warmup_epochs": 1,
                "lr": 1e-2,
                "drop_path_rate": 0.1,
                "mixup": 0.8,
                "cutmix": 1.0,
                "erasing_prob": 0.5,
                "checkpoint_every": 2,
            },
            "train": {"device": "cpu"},
        },
        *overrides,
    )


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, point: str | None, occurrence: int) -> None:
        self.point, self.occurrence, self.seen = point, occurrence, 0

    def reached(self, point: str) -> bool:
        if point != self.point:
            return False
        self.seen += 1
        return self.seen == self.occurrence


def install_kill_point(point: str, occurrence: int) -> None:
    """Patch this process so that it SIGKILLs itself at the ``occurrence``-th time it reaches ``point``."""
    from mugs.training import checkpoint as ckpt
    from mugs.training import engine, log

    counter = _Counter(point, occurrence)

    def before(function: Callable, name: str) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if counter.reached(name):
                _die()
            return function(*args, **kwargs)

        return wrapped

    engine.Trainer.fit = before(engine.Trainer.fit, "startup")
    engine.Trainer._mark_done = before(engine.Trainer._mark_done, "done")
    ckpt.keep_checkpoint = before(ckpt.keep_checkpoint, "keep")

    torch_save = torch.save

    def half_written_save(payload: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(handle, "name", None) is not None and counter.reached("checkpoint-write"):
            buffer = io.BytesIO()
            torch_save(payload, buffer, *args, **kwargs)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            _die()
        torch_save(payload, handle, *args, **kwargs)

    torch.save = half_written_save

    replace = os.replace

    def killing_replace(source: Any, target: Any) -> None:
        name = Path(target).name
        if name == LATEST and counter.reached("checkpoint-rename"):
            _die()
        if name.startswith("epoch") and counter.reached("keep-rename"):
            _die()
        replace(source, target)

    os.replace = killing_replace

    def torn_write(self: log.MetricsLog, record: dict[str, Any]) -> None:
        if self.enabled and counter.reached("log-write"):
            with self.path.open("a") as handle:
                line = json.dumps(record)
                handle.write(line[: len(line) // 2])
            _die()
        log_write(self, record)

    log_write = log.MetricsLog.write
    log.MetricsLog.write = torn_write


def slow_down_steps(seconds: float) -> None:
    """Make every training step last ``seconds`` longer, so signals can be sent in the middle of a run."""
    from mugs.evaluation.finetune import FineTuner
    from mugs.training.engine import Trainer

    for trainer in (Trainer, FineTuner):
        train_step = trainer.train_step

        def slow_step(self: Any, *args: Any, _step: Callable = train_step, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return _step(self, *args, **kwargs)

        trainer.train_step = slow_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--kill-at", help="POINT:N, one of " + ", ".join(POINTS))
    parser.add_argument("--kill-after", type=float, help="SIGKILL after this many seconds of training")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--finetune", metavar="CHECKPOINT", help="fine-tune this checkpoint instead")
    args = parser.parse_args(argv)

    from mugs.launch.jobs import Finetuning, Pretraining
    from mugs.launch.local import launch_local
    from mugs.launch.signals import stopped_by_signal
    from mugs.training.checkpoint import MissingCheckpointError
    from mugs.training.run_lock import RunLockedError

    if args.kill_at:
        point, _, occurrence = args.kill_at.partition(":")
        if point not in POINTS:
            parser.error(f"unknown point {point!r}")
        install_kill_point(point, int(occurrence or 1))
    if args.step_delay:
        slow_down_steps(args.step_delay)
    timer = threading.Timer(args.kill_after if args.kill_after is not None else 1e9, _die)
    timer.daemon = True
    if args.kill_after is not None:
        timer.start()
    started = time.perf_counter()
    try:
        if args.finetune:
            config = finetune_reliability_config(*args.overrides)
            job = Finetuning(args.finetune, f"{args.run_dir}.json")
        else:
            config = reliability_config(args.run_dir, *args.overrides)
            job = Pretraining(reliability_dataset(), MEAN_STD)
        result = launch_local(config, args.nprocs, job=job, progress=False)
    except (RunLockedError, MissingCheckpointError, ValueError) as error:  # as `mugs pretrain` reports them
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    timer.cancel()
    summary = {"status": result.status, "global_iteration": result.global_iteration, "seconds": seconds}
    print(json.dumps(summary))
    if result.stopped_by is not None:
        message, code = stopped_by_signal(result)
        print(message, file=sys.stderr)
        return code
    return 0


def serve(requests: IO[str] = sys.stdin, answers: IO[str] = sys.stdout) -> None:
    """Run one forked :func:`main` per request line, one at a time, from this already-imported process.

    A request is ``{"argv": [...], "stdout": path, "stderr": path}``; the answers are ``{"pid": n}``
    when the run starts (to signal it) and ``{"returncode": r}`` when it ends (-N: killed by signal N).
    Forking saves each run the seconds of importing torch; the run is otherwise an ordinary process
    (its own pid, lock, signal handlers and exit). Nothing here has run torch yet, so no thread pool
    is forked.
    """
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            for stream, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), stream)
            try:
                code = main(request["argv"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 2
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        import mugs.launch.local  # noqa: F401  (imported once, before the forks)

        serve()
    else:
        sys.exit(main())
