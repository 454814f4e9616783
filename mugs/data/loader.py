"""Reproducible, resumable pretraining input: the batch order and every augmentation are functions of
``(seed, epoch, index)`` alone.

That makes a run independent of the number of loader workers, lets a job stop in the middle of an
epoch and resume at the next iteration with exactly the images and crops it would have seen, and
gives every rank of a distributed run its slice of the same global batch a single process would use.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mugs import distributed
from mugs.config import Config
from mugs.data.device_augment import DeviceAugmentation
from mugs.data.device_params import DeviceMultiCropParams, collate_device
from mugs.data.transforms import CropFinisher, MultiCropAugmentation, collate_multicrop


def _mix(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    return _mix(seed, epoch, index)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the pretraining loader: its processes ignore SIGINT and SIGTERM.

    The training process stops cleanly on them, at the end of the iteration; a terminal's Ctrl-C
    reaches the whole process group, and workers that died of it would fail that last iteration.
    A worker whose parent dies exits on its own (PyTorch's watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SeededAugmentedDataset(Dataset):
    """Wraps a dataset of ``(PIL image, label)``; item ``(epoch, index)`` is ``(transform(image), label)``
    with Python's and torch's RNGs seeded by :func:`sample_seed` for the duration of the transform.

    The caller's RNG states are restored afterwards, so loading in the main process (``num_workers=0``)
    does not disturb the training RNG (drop path).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        image, label = self.dataset[index]
        python_state, torch_state = random.getstate(), torch.get_rng_state()
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        # the CPU generator alone: torch.manual_seed would also seed (and leave changed) the CUDA ones,
        # and it records a stack trace per call while CUDA is not initialised (0.4 ms per image)
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            random.setstate(python_state)
            torch.set_rng_state(torch_state)


class GlobalBatchSampler:
    """Yields, for one rank, its share of each global batch as a list of ``(epoch, index)`` keys.

    Epoch ``e`` visits ``permutation(seed, e)`` in global batches of ``global_batch`` images (the last
    incomplete batch is dropped); rank ``r`` of ``world`` takes the ``r``-th contiguous slice of each.
    :meth:`set_position` selects the epoch and the first iteration, so a resumed run skips the
    batches it already trained on without loading them.
    """

    def __init__(
        self, dataset_size: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if dataset_size < global_batch:
            raise ValueError(
                f"the dataset has {dataset_size} images, fewer than one global batch ({global_batch})"
            )
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_iteration = 0

    @property
    def iterations_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def set_position(self, epoch: int, start_iteration: int = 0) -> None:
        self.epoch = epoch
        self.start_iteration = start_iteration

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __len__(self) -> int:
        return self.iterations_per_epoch - self.start_iteration

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.permutation(self.epoch)
        for iteration in range(self.start_iteration, self.iterations_per_epoch):
            first = iteration * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, int(i)) for i in order[first : first + self.local_batch]]


def build_transform(config: Config, mean: tuple[float, ...]) -> MultiCropAugmentation:
    """The multi-crop views of a run's images; ``mean`` (the data's) fills what RandAugment uncovers.
    With ``augment.backend: device``, only their parameters (pixels: :func:`build_finisher`)."""
    augment = config.augment
    views = DeviceMultiCropParams if augment.backend == "device" else MultiCropAugmentation
    return views(
        global_size=augment.global_size,
        local_size=augment.local_size,
        n_local=augment.n_local,
        global_scale=augment.global_scale,
        local_scale=augment.local_scale,
        weak_prob=augment.weak_prob,
        mean=mean,
        rand_augment=augment.rand_augment,
        erasing_prob=augment.erasing_prob,
    )


def build_loader(
    config: Config,
    dataset: Dataset,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    sampler: GlobalBatchSampler,
    *,
    device: torch.device,
    host_group: dist.ProcessGroup | None = None,
) -> DataLoader:
    """The pretraining input: seeded multi-crop views of ``dataset`` in the sampler's batches, augmented
    by ``train.num_workers`` persistent processes (or in this process when it is 0). Its batches hold
    uint8 crops (``MultiCropBatch``), or with ``augment.backend: device`` images and view parameters
    (``DeviceBatch``); :func:`build_finisher` with the same ``mean_std`` makes the model's input of them.
    """
    augmented = SeededAugmentedDataset(dataset, build_transform(config, mean_std[0]), config.train.seed)
    workers = distributed.loader_workers(config.train.num_workers, device, host_group)
    return DataLoader(
        augmented,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_device if config.augment.backend == "device" else collate_multicrop,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # each iter() draws its workers' base seed from this generator; without one it would come
        # from the global torch RNG, which drop path also uses and a checkpoint restores, so a
        # resumed run would draw once more than an uninterrupted one and diverge from it
        generator=torch.Generator().manual_seed(config.train.seed),
        worker_init_fn=ignore_stop_signals,
    )


def build_finisher(
    config: Config, mean_std: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device
) -> CropFinisher | DeviceAugmentation:
    """The step from a loader batch to the normalised crops on ``device``, for ``augment.backend``."""
    if config.augment.backend == "device":
        augment = config.augment
        return DeviceAugmentation(
            *mean_std, device, global_size=augment.global_size, local_size=augment.local_size
        )
    return CropFinisher(*mean_std, device)
