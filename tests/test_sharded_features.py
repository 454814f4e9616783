"""Feature extraction sharded over the ranks of a process group (2 gloo ranks here) writes the same
cache file, bit for bit, as one process."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mugs.config import Config, config_from_dict
from mugs.data.prepare import run_prepare
from mugs.evaluation.features import extract_features
from mugs.launch.local import free_port
from mugs.model.backbone import create_backbone
from mugs.testing.synthetic import write_imagefolder
from mugs.training import checkpoint as ckpt


def tiny_config(tmp: Path, cache: str) -> Config:
    return config_from_dict(
        {
            "model": {"arch": "vit_tiny", "depth": 2, "patch_size": 7},
            "augment": {"global_size": 28, "local_size": 14},
            "data": {
                "source": "imagefolder",
                "root": str(tmp / "images"),
                "prepared_dir": str(tmp / "prepared"),
            },
            # 5 batches of 4 and one of 3: the second rank has no batch in the last round
            "evaluate": {
                "device": "cpu",
                "batch_size": 4,
                "num_workers": 0,
                "cache_dir": str(tmp / cache),
                "linear_n_last_blocks": 2,
            },
            "train": {"threads": 1},
        }
    )


def _extract(rank: int, world_size: int, port: int, tmp: Path, cache: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for layers, avgpool in ((1, False), (2, True)):
            features = extract_features(
                tmp / "checkpoint.pt",
                "train",
                tiny_config(tmp, cache),
                cache_dir=tmp / cache,
                layers=layers,
                avgpool=avgpool,
                progress=False,
            )
            assert len(features) == 23  # every rank returns the whole split
    finally:
        dist.destroy_process_group()


def test_two_ranks_extract_bit_identical_to_one_process(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "images", {"train": 23, "val": 3}, side=30)
    config = tiny_config(tmp_path, "one")
    run_prepare(config.data, progress=False)
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", patch_size=7, img_size=28, depth=2)
    teacher = {f"backbone.{name}": value for name, value in backbone.state_dict().items()}
    ckpt.atomic_save(
        {"format": ckpt.FORMAT, "teacher": teacher, "config": config.to_dict()}, tmp_path / "checkpoint.pt"
    )

    torch.set_num_threads(1)
    for layers, avgpool in ((1, False), (2, True)):
        extract_features(
            tmp_path / "checkpoint.pt",
            "train",
            config,
            cache_dir=tmp_path / "one",
            layers=layers,
            avgpool=avgpool,
            progress=False,
        )
    mp.spawn(_extract, args=(2, free_port(), tmp_path, "two"), nprocs=2, join=True)

    one = sorted((tmp_path / "one").glob("*.pt"))
    two = sorted((tmp_path / "two").glob("*.pt"))
    assert [path.name for path in one] == [path.name for path in two] and len(one) == 2
    for a, b in zip(one, two, strict=True):
        first, second = (torch.load(path, weights_only=True) for path in (a, b))
        assert torch.equal(first["features"], second["features"]), a.name
        assert torch.equal(first["labels"], second["labels"])
        assert first["meta"] == second["meta"]
        assert first["features"].abs().sum(dim=1).min() > 0  # no row left as the gather's padding
