"""Frozen backbone features of a prepared split, extracted once per checkpoint and cached on disk.

The evaluation view of an image is the ImageNet protocol scaled to the training crop: resize the
shorter side to ``round(g · 256 / 224)`` (bicubic), centre-crop ``g``, normalise with the train split's
statistics, where ``g`` is the checkpoint's ``augment.global_size`` (224 → 256/224; 32 → 37/32).

A feature row is the concatenation of the class tokens of the last ``layers`` blocks, each after the
backbone's final norm, optionally followed by the mean of the last block's normed patch tokens
(``layers=1, avgpool=False`` is the kNN feature: the CLS token after the final norm).

Extraction is sharded over the ranks of a process group, batch by batch, bit-identical to one
process (:func:`_extract_rows`). Rows are written straight into a file-backed tensor, so extracting an
ImageNet-size split holds one batch in memory rather than the whole ``N × D`` matrix; cached files are
opened memory-mapped.
A cache file is written under a temporary name, synced and renamed, then its size and SHA-256 go
into a sidecar (``<name>.integrity.json``); a cache whose bytes do not match the sidecar (truncated,
corrupt, or the sidecar missing) is extracted again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mugs import distributed
from mugs.config import Config
from mugs.files import file_sha256
from mugs.model.backbone import MugsViT, create_backbone
from mugs.progress import progress_display
from mugs.training.checkpoint import atomic_save, backbone_state, load_checkpoint, trained_config

__all__ = [
    "FeatureSet",
    "coarse_map",
    "eval_geometry",
    "eval_transform",
    "evaluation_features",
    "extract_features",
    "feature_cache_path",
    "features_of_batch",
    "load_backbone",
    "load_feature_file",
]

FORMAT = "mugs-features/1"
# bump when the transform or the feature definition changes, so stale caches are not reused
_RECIPE = "resize-256/224-bicubic+centre-crop+normalise; cls-after-norm(last n)+mean-patch"


@dataclass
class FeatureSet:
    """Features ``[N, D]`` float32 with their fine (and, where defined, coarse) labels, in split order."""

    features: Tensor
    labels: Tensor
    coarse_labels: Tensor | None
    classes: list[str]
    coarse_classes: list[str] | None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def coarse_of_class(self) -> Tensor | None:
        """``[num_classes]`` coarse label of each fine class (-1 for a class absent from this set).

        Derived from the (fine, coarse) pairs; a fine class seen with two coarse labels is an error.
        """
        return (
            None
            if self.coarse_labels is None
            else coarse_map(self.labels, self.coarse_labels, self.num_classes)
        )


def coarse_map(labels: Tensor, coarse_labels: Tensor, num_classes: int) -> Tensor:
    """``[num_classes]`` coarse label of each fine class seen in the ``(labels, coarse_labels)`` pairs
    (-1 for one absent); a fine class seen with two coarse labels is an error."""
    mapping = torch.full((num_classes,), -1, dtype=torch.int64)
    mapping[labels] = coarse_labels
    if not torch.equal(mapping[labels], coarse_labels):
        raise ValueError("a fine class maps to more than one coarse class")
    return mapping


def eval_geometry(global_size: int) -> list[nn.Module]:
    """The evaluation view's geometry: resize the shorter side to ``round(global_size · 256/224)``
    (bicubic), centre-crop ``global_size``."""
    return [
        T.Resize(round(global_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(global_size),
    ]


def eval_transform(global_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """The evaluation view (:func:`eval_geometry`), to tensor, normalised."""
    return T.Compose(
        [
            *eval_geometry(global_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _first_mismatch(expected: dict[str, Tensor], state: dict[str, Tensor], prefix: str) -> str | None:
    """The first tensor of ``state`` that is missing, unexpected or misshapen against ``expected``."""
    differing = sorted(set(expected) ^ set(state))
    if differing:
        where = "is missing from the weights" if differing[0] in expected else "has no place in it"
        return f"{prefix}{differing[0]} {where}"
    for name, value in state.items():
        if value.shape != expected[name].shape:
            return f"{prefix}{name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
    return None


def load_backbone(
    checkpoint: dict[str, Any], network: str = "teacher", *, source: str | Path = "the checkpoint"
) -> tuple[MugsViT, Config]:
    """The ``network`` backbone of a loaded checkpoint, in eval mode, and the config it was trained with.

    Weights that do not fit the recorded architecture are an error naming ``source`` (the file) and
    the first tensor that differs.
    """
    if network not in ("teacher", "student"):
        raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
    trained = trained_config(checkpoint, source)
    state = backbone_state(checkpoint, network, source=source)
    # built on the meta device: the random initialisation would be overwritten anyway (and costs seconds)
    with torch.device("meta"):
        backbone = create_backbone(
            trained.model.arch,
            patch_size=trained.model.patch_size,
            img_size=trained.augment.global_size,
            relation_block=any(name.startswith("relation_blocks.") for name in state),
            depth=trained.model.depth,
        )
    mismatch = _first_mismatch(backbone.state_dict(), state, f"{network}.backbone.")
    if mismatch is not None:
        model = trained.model
        raise ValueError(
            f"{source}: the weights do not fit the recorded architecture (model.arch={model.arch}, "
            f"model.depth={model.depth}, model.patch_size={model.patch_size}, augment.global_size="
            f"{trained.augment.global_size}): {mismatch}"
        )
    backbone.load_state_dict(state, strict=True, assign=True)
    return backbone.eval(), trained


def _cache_key(checkpoint_sha: str, split: str, network: str, layers: int, avgpool: bool, config: Config):
    from mugs.data.datasets import read_stats

    prepared = Path(config.data.prepared_dir)
    summary = json.loads((prepared / "summary.json").read_text())
    settings = {
        "format": FORMAT,
        "recipe": _RECIPE,
        "checkpoint_sha256": checkpoint_sha,
        "split": split,
        "split_manifest_sha256": summary.get("manifest_sha256", {}).get(split),
        "network": network,
        "layers": layers,
        "avgpool": avgpool,
        "mean_std": [list(v) for v in read_stats(prepared)],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(), settings


def feature_cache_path(
    checkpoint: Path, split: str, config: Config, *, network: str, cache_dir: Path, layers: int, avgpool: bool
) -> Path:
    """Where :func:`extract_features` caches these features (the name carries the full key's digest)."""
    checkpoint_sha = file_sha256(checkpoint)
    key, _ = _cache_key(checkpoint_sha, split, network, layers, avgpool, config)
    pool = "-avgpool" if avgpool else ""
    return Path(cache_dir) / f"{checkpoint_sha[:16]}-{split}-{network}-last{layers}{pool}-{key[:12]}.pt"


def load_feature_file(path: str | Path) -> FeatureSet:
    """Open a cached feature file (memory-mapped, ``weights_only``)."""
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a feature file of format {FORMAT!r}")
    return FeatureSet(
        features=payload["features"],
        labels=payload["labels"],
        coarse_labels=payload["coarse_labels"],
        classes=payload["classes"],
        coarse_classes=payload["coarse_classes"],
        meta=payload["meta"],
    )


def _integrity_path(cache: Path) -> Path:
    """The sidecar holding the size and SHA-256 that ``cache`` had when it was written."""
    return cache.with_name(f"{cache.name}.integrity.json")


def _save_cache(payload: dict[str, Any], path: Path) -> None:
    """Write the feature file atomically, then the record that :func:`_cache_problem` checks it against.

    The record needs no atomic write: a torn one is not valid JSON, and the cache is extracted again.
    """
    atomic_save(payload, path)
    record = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    _integrity_path(path).write_text(json.dumps(record))


def _cache_problem(path: Path) -> str | None:
    """Why the cache file ``path`` cannot be trusted, or None when its size and SHA-256 are those
    recorded when it was written."""
    sidecar = _integrity_path(path)
    try:
        record = json.loads(sidecar.read_text())
        size, sha256 = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable size and checksum record ({sidecar.name})"
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"has {actual_size} bytes where {size} were written"
    if file_sha256(path) != sha256:
        return "does not match the SHA-256 recorded when it was written"
    return None


def _load_verified_cache(path: Path) -> FeatureSet | None:
    """The cached features at ``path`` if the file passes its size and checksum check and loads;
    otherwise None, after a one-line warning naming the file."""
    problem = _cache_problem(path)
    if problem is None:
        try:
            return load_feature_file(path)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as error:
            reason = str(error).strip().splitlines()
            problem = f"cannot be read ({reason[0] if reason else type(error).__name__})"
    Console(stderr=True).print(
        f"[yellow]warning:[/yellow] feature cache {path} {problem}; extracting the features again",
        highlight=False,
        soft_wrap=True,
    )
    return None


def features_of_batch(backbone: MugsViT, images: Tensor, layers: int, avgpool: bool) -> Tensor:
    """The feature rows of ``images``: the CLS tokens of the last ``layers`` blocks after the final
    norm, then (``avgpool``) the mean of the last block's normed patch tokens."""
    outputs = backbone.get_intermediate_layers(images, n=layers, return_prefix_tokens=True, norm=True)
    parts = [prefix[:, 0] for _, prefix in outputs]
    if avgpool:
        parts.append(outputs[-1][0].mean(dim=1))
    return torch.cat(parts, dim=1)


def _extract_rows(
    backbone: MugsViT,
    dataset: Dataset,
    features: Tensor | None,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    layers: int,
    avgpool: bool,
    description: str,
    progress: bool,
) -> None:
    """Fill ``features [N, D]`` (the main rank's; None elsewhere) with the rows of ``dataset``, sharded
    over the ranks of the default process group, or all here when there is none.

    The split is cut into the batches one process would use and in round ``j`` rank ``r`` computes batch
    ``j · world + r``, so every image goes through the backbone in the same batch as in one process
    and the rows are bit-identical to its. Each round's batches are gathered to the main rank, which
    alone holds the rows.
    """
    rank, world = distributed.rank(), distributed.world_size()
    dim = backbone.embed_dim * (layers + int(avgpool))
    n_batches = math.ceil(len(dataset) / batch_size)
    batches = [range(b * batch_size, min((b + 1) * batch_size, len(dataset))) for b in range(n_batches)]
    loader = iter(
        DataLoader(
            dataset,
            batch_sampler=[list(batch) for batch in batches[rank::world]],
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
    )
    # gloo gathers host tensors, NCCL device ones
    gather_device = device if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    with progress_display(progress, main_process=rank == 0) as bar:
        task = bar.add_task(description, total=len(dataset), unit="images")
        for first in range(0, n_batches, world):
            rows = torch.zeros(batch_size, dim, device=gather_device)
            if first + rank < n_batches:  # in the last round a rank may have no batch, yet it gathers
                images, _labels = next(loader)
                batch = features_of_batch(backbone, images.to(device, non_blocking=True), layers, avgpool)
                rows[: len(batch)] = batch.float()
            parts = [rows]
            if world > 1:
                parts = [torch.empty_like(rows) for _ in range(world)] if rank == 0 else None
                dist.gather(rows, parts, dst=0)
            if features is not None:
                for part, index in zip(parts, batches[first : first + world], strict=False):
                    features[index.start : index.stop] = part[: len(index)].cpu()
                bar.update(task, completed=batches[min(first + world, n_batches) - 1].stop)


@torch.inference_mode()
def extract_features(
    checkpoint: Path,
    split: str,
    config: Config,
    *,
    network: str = "teacher",
    cache_dir: Path,
    layers: int = 1,
    avgpool: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Features of ``split`` (of ``config.data.prepared_dir``) under ``checkpoint``'s ``network`` backbone.

    Returns the cached file when one with the same key exists (checkpoint SHA-256, split and its
    manifest hash, network, layers, avgpool, normalisation, recipe version) and passes its size and
    checksum check; otherwise extracts in batches of ``config.evaluate.batch_size`` on ``device``
    (default ``config.evaluate.device``) and writes the cache atomically. In a process group every rank
    calls it: they share the batches, the main rank writes the file, and all return it.
    """
    from mugs.data.datasets import open_split, read_stats

    if layers <= 0:
        raise ValueError(f"layers must be positive, got {layers}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    path = feature_cache_path(
        checkpoint, split, config, network=network, cache_dir=cache_dir, layers=layers, avgpool=avgpool
    )
    if path.is_file() and (cached := _load_verified_cache(path)) is not None:
        return cached

    device = (
        torch.device(device) if device is not None else distributed.resolve_device(config.evaluate.device)
    )
    backbone, trained = load_backbone(load_checkpoint(checkpoint), network)
    backbone.to(device)
    prepared = config.data.prepared_dir
    mean, std = read_stats(prepared)
    dataset = open_split(prepared, split, eval_transform(trained.augment.global_size, mean, std))
    extract = functools.partial(
        _extract_rows,
        backbone,
        dataset,
        batch_size=config.evaluate.batch_size,
        num_workers=config.evaluate.num_workers,
        device=device,
        layers=layers,
        avgpool=avgpool,
        description=f"features {split} ({network})",
        progress=progress,
    )
    if distributed.rank() != 0:
        extract(None)
        dist.barrier()  # the main rank has written the cache
        return load_feature_file(path)
    dim = backbone.embed_dim * (layers + int(avgpool))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, buffer_path = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".bin", dir=path.parent)
    os.close(descriptor)
    try:
        features = torch.from_file(buffer_path, shared=True, size=len(dataset) * dim, dtype=torch.float32)
        extract(features.view(len(dataset), dim))
        _key, settings = _cache_key(file_sha256(checkpoint), split, network, layers, avgpool, config)
        payload = {
            "format": FORMAT,
            "meta": {**settings, "global_size": trained.augment.global_size, "arch": trained.model.arch},
            "features": features.view(len(dataset), dim),
            "labels": torch.from_numpy(dataset.labels.copy()),
            "coarse_labels": None
            if dataset.coarse_labels is None
            else torch.from_numpy(dataset.coarse_labels.copy()),
            "classes": list(dataset.classes),
            "coarse_classes": None if dataset.coarse_classes is None else list(dataset.coarse_classes),
        }
        _save_cache(payload, path)
    finally:
        Path(buffer_path).unlink(missing_ok=True)
    if distributed.world_size() > 1:
        dist.barrier()
    return load_feature_file(path)


def evaluation_features(
    checkpoint: str | Path,
    config: Config,
    splits: Sequence[str],
    *,
    linear: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[FeatureSet]:
    """The features ``config.evaluate`` asks for, one :class:`FeatureSet` per split: kNN's (the last
    block's CLS) or, with ``linear``, the linear probe's (last ``linear_n_last_blocks`` CLS tokens and
    optionally the pooled patch tokens)."""
    settings = config.evaluate
    return [
        extract_features(
            Path(checkpoint),
            split,
            config,
            network=settings.network,
            cache_dir=Path(settings.cache_dir),
            layers=settings.linear_n_last_blocks if linear else 1,
            avgpool=settings.linear_avgpool if linear else False,
            device=device,
            progress=progress,
        )
        for split in splits
    ]
