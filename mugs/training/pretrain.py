"""Pretraining in the current process: open the prepared data, build the trainer, run it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from mugs import distributed
from mugs.config import Config
from mugs.files import remove_stale_temporaries
from mugs.rundir import RunDir
from mugs.training import checkpoint as ckpt
from mugs.training.engine import Trainer, TrainResult
from mugs.training.run_lock import RunLockedError, exclusive_run


def training_dataset(config: Config) -> tuple[Dataset, tuple[tuple, tuple]]:
    """The prepared train split (optionally a seeded subset) and its per-channel mean and std."""
    from mugs.data.datasets import open_split, read_stats

    dataset = open_split(config.data.prepared_dir, "train")
    subset = config.data.train_subset
    if subset is not None and subset < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.data.split_seed))
        dataset = Subset(dataset, sorted(order[:subset].tolist()))
    return dataset, read_stats(config.data.prepared_dir)


@contextmanager
def locked_run_directory(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (rank 0, the run's only writer) while the body runs; every rank raises
    :class:`RunLockedError` when rank 0 could not take it. Temporary files of a killed writer go."""
    refusal = None
    with ExitStack() as lock:
        if distributed.is_main_process():
            try:
                lock.enter_context(exclusive_run(run_dir))
            except RunLockedError as error:
                refusal = str(error)
            else:
                for directory in (run_dir, RunDir(run_dir).checkpoints):
                    remove_stale_temporaries(directory)
        refusal = distributed.broadcast_object(refusal)
        if refusal:
            raise RunLockedError(refusal)
        yield


def set_aside_if_changed(config: Config) -> Path | None:
    """Move a run directory whose checkpoint was made with other settings out of the way.

    A pipeline rerun after a parameter change must train afresh, but the earlier run is a finished
    result: it is renamed to ``<output_dir>.superseded-<UTC time>``, never deleted. Returns the new name.
    """
    output_dir = Path(config.train.output_dir)
    latest = RunDir(output_dir).latest
    if not latest.exists():
        return None
    saved = ckpt.load_checkpoint(latest)["config"]
    if not ckpt.incompatible_keys(saved, config.to_dict()):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = output_dir.with_name(f"{output_dir.name}.superseded-{stamp}")
    with exclusive_run(output_dir):  # never move a run that is training
        output_dir.rename(target)
    return target


def run_pretraining(
    config: Config,
    *,
    dataset: Dataset | None = None,
    mean_std: tuple[tuple, tuple] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    progress: bool = True,
    locked: bool = False,
) -> TrainResult:
    """Train (or resume) the run in ``config.train.output_dir``; pass ``dataset`` to bypass the manifest.

    The run directory is locked throughout: a second start fails at once (:class:`RunLockedError`);
    with ``locked`` the caller (a launcher) holds the lock already. A start refused for want of the
    device, the lock or a resumable checkpoint writes nothing into the run directory.
    """
    distributed.resolve_device(config.train.device)  # before the lock creates the run directory
    with nullcontext() if locked else locked_run_directory(Path(config.train.output_dir)):
        if dataset is None:
            dataset, mean_std = training_dataset(config)
        assert mean_std is not None, "a dataset passed in needs its mean_std"
        trainer = Trainer(config, dataset, mean_std=mean_std)
        return trainer.fit(stop_requested=stop_requested, progress=progress)
