"""The paper's linear probe (DINO's protocol, ``evaluate.linear_protocol: augmented``).

Every epoch the training images' random-resized crops and horizontal flips (DINO's linear-evaluation
transform, at the checkpoint's global crop size) go through the frozen backbone, once per batch; that
one forward feeds every head of the learning-rate × weight-decay sweep (:class:`HeadSweep`, as
DINOv2's linear evaluation does), so the sweep costs one backbone pass per batch whatever its size.
Val and test are the centre-crop views, which a frozen backbone maps to the same features every
epoch: they come from the feature cache. The head with the best val top-1 is chosen as in the cached
protocol, and only it sees the test split.

The batch order and every crop are functions of ``(seed, epoch, index)`` (the pretraining loader's
:class:`SeededAugmentedDataset` and :class:`GlobalBatchSampler`, whose incomplete last batch is
dropped), so the loop holds no running random state: :meth:`AugmentedProbe.state_dict` (the heads,
their momentum, the step, the epoch and the batch within it) restores it exactly, and a run stopped
after any batch and restored ends bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mugs.config import Config
from mugs.data.loader import GlobalBatchSampler, SeededAugmentedDataset
from mugs.evaluation.features import FeatureSet, coarse_map, features_of_batch, load_backbone
from mugs.evaluation.heads import HeadSweep, SweepSettings, sweep_report
from mugs.model.backbone import MugsViT
from mugs.progress import progress_display

__all__ = ["AugmentedProbe", "augmented_linear_evaluate", "probe_transform"]

STATE_FORMAT = "mugs-augmented-probe/1"


def probe_transform(global_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """DINO's linear-evaluation training view at ``global_size``: a random-resized crop (area 8-100 %),
    a horizontal flip with probability ½, normalised."""
    return T.Compose(
        [
            T.RandomResizedCrop(global_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class AugmentedProbe:
    """The augmented probe's training loop over ``dataset`` (``(PIL image, label)`` items) with
    ``transform``, scored on the cached ``val`` features after every epoch.

    :meth:`fit` trains until the last epoch or until ``stop()`` answers true after a batch;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore where it stands.
    """

    def __init__(
        self,
        backbone: MugsViT,
        dataset: Dataset,
        transform: Callable[[Any], Tensor],
        val: FeatureSet,
        sweep: SweepSettings,
        *,
        layers: int,
        avgpool: bool,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.backbone = backbone
        self.val = val
        self.layers, self.avgpool = layers, avgpool
        self.epochs = sweep.epochs
        self.device = torch.device(device)
        self.sampler = GlobalBatchSampler(len(dataset), sweep.batch_size, seed=sweep.seed)
        self.loader = DataLoader(
            SeededAugmentedDataset(dataset, transform, sweep.seed),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.heads = HeadSweep(
            sweep.lrs,
            sweep.weight_decays,
            backbone.embed_dim * (layers + int(avgpool)),
            val.num_classes,
            batch_size=sweep.batch_size,
            total_steps=sweep.epochs * self.sampler.iterations_per_epoch,
            min_lr=sweep.min_lr,
            seed=sweep.seed,
            device=self.device,
        )
        self.epoch = 0  # epochs finished
        self.iteration = 0  # batches of the current epoch trained on
        self.val_batch = max(sweep.batch_size, 1024)

    def fit(self, stop: Callable[[], bool] = lambda: False, *, progress: bool = False) -> bool:
        """Train from where the probe stands; True when every epoch is done, False when ``stop()``
        answered true after a batch (the state is then that batch's end)."""
        per_epoch = self.sampler.iterations_per_epoch
        with progress_display(progress) as bar:
            task = bar.add_task(
                f"augmented linear probes ({len(self.heads.pairs)} heads)",
                total=self.epochs * per_epoch,
                completed=self.epoch * per_epoch + self.iteration,
                unit="batches",
            )
            while self.epoch < self.epochs:
                self.sampler.set_position(self.epoch, self.iteration)
                for images, labels in self.loader:
                    with torch.no_grad():
                        x = features_of_batch(
                            self.backbone,
                            images.to(self.device, non_blocking=True),
                            self.layers,
                            self.avgpool,
                        )
                    self.heads.train_step(x.float(), labels.to(self.device))
                    self.iteration += 1
                    bar.update(task, advance=1)
                    if stop():
                        return False
                best = self.heads.end_epoch(
                    self.epoch + 1, self.val.features, self.val.labels, self.val_batch
                )
                self.epoch, self.iteration = self.epoch + 1, 0
                bar.update(task, description=f"augmented linear probes: best val top-1 {best:.4f}")
        return True

    def state_dict(self) -> dict[str, Any]:
        """Where the loop stands; the crops and the order need no RNG state (see the module docstring)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "heads": self.heads.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not an augmented-probe state (format {state.get('format')!r}, not {STATE_FORMAT!r})"
            )
        self.heads.load_state_dict(state["heads"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])


def augmented_linear_evaluate(
    checkpoint: str | Path,
    config: Config,
    val: FeatureSet,
    test: FeatureSet,
    sweep: SweepSettings,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the sweep on augmented views of ``config``'s train split through ``checkpoint``'s frozen
    backbone, select on ``val``, report the selected head on ``test`` (both cached features)."""
    from mugs.data.datasets import open_split, read_stats
    from mugs.training.checkpoint import load_checkpoint

    settings = config.evaluate
    backbone, trained = load_backbone(load_checkpoint(checkpoint), settings.network, source=checkpoint)
    device = torch.device(device) if device is not None else torch.device("cpu")
    prepared = config.data.prepared_dir
    mean, std = read_stats(prepared)
    train = open_split(prepared, "train")
    probe = AugmentedProbe(
        backbone.to(device),
        train,
        probe_transform(trained.augment.global_size, mean, std),
        val,
        sweep,
        layers=settings.linear_n_last_blocks,
        avgpool=settings.linear_avgpool,
        num_workers=settings.num_workers,
        device=device,
    )
    probe.fit(progress=progress)
    coarse = None
    if train.coarse_labels is not None:
        labels, coarse_labels = torch.from_numpy(train.labels), torch.from_numpy(train.coarse_labels)
        coarse = coarse_map(labels, coarse_labels, len(train.classes))
    report = sweep_report(probe.heads.result(), test, coarse, sweep)
    return {**report, "iterations_per_epoch": probe.sampler.iterations_per_epoch}
