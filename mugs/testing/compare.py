"""Exact comparisons of checkpoints and run directories (pretraining and fine-tuning), for the promises
of exact resume and determinism: every tensor (weights, memories, queues, centre, optimizer moments,
RNG states), number and string must be equal, not close."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mugs.rundir import RunDir
from mugs.training import checkpoint as ckpt
from mugs.training.log import MetricsLog

# measured, not computed: they differ between any two runs
TIMING_KEYS = frozenset({"images_per_second", "data_wait_fraction"})


def assert_same(a: Any, b: Any, where: str) -> None:
    """Equal in every tensor (dtype and values), number, string and structure; ``where`` names the
    first difference."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(path: Path, expected: Path) -> None:
    """Everything in the two checkpoints; of their configs, the settings the result depends on (a
    resumed run may change the others, such as ``train.max_iterations`` or ``train.num_workers``)."""
    payload, reference = ckpt.load_checkpoint(path), ckpt.load_checkpoint(expected)
    assert ckpt.incompatible_keys(payload.pop("config"), reference.pop("config")) == [], path
    assert_same(payload, reference, path.name)


def log_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's log records without their timings."""
    return [
        {key: value for key, value in record.items() if key not in TIMING_KEYS}
        for _, record in MetricsLog(RunDir(run_dir).log, enabled=True).records()
    ]


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """``latest.pt``, every kept checkpoint, ``DONE`` and the log are those of the reference run, and
    no temporary file of a killed writer is left."""
    run, reference = RunDir(run_dir), RunDir(reference_dir)
    directory, expected = run.checkpoints, reference.checkpoints
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in sorted(expected.iterdir()):
        assert_same_checkpoint(directory / path.name, path)
    assert run.done.read_text() == reference.done.read_text()
    assert log_records(run_dir) == log_records(reference_dir), f"{run.log} differs from the reference"
    assert not list(Path(run_dir).glob(".*.tmp"))


def finetune_metrics(out: Path) -> dict[str, Any]:
    """A fine-tuning metrics file less what differs between any two runs: its timings, the time it was
    written and the commit it ran at."""
    metrics = json.loads(Path(out).read_text())
    del metrics["timing"], metrics["provenance"]["created"], metrics["provenance"]["git"]
    return metrics


def assert_same_finetuning(run_dir: Path, reference_dir: Path) -> None:
    """The fine-tuning run in ``run_dir`` (metrics in ``run_dir.json``) ended as the reference: the
    same ``latest.pt`` (weights, optimizer, every rank's RNG states, history, best epoch and its
    weights) and metrics, and no temporary file or set-aside state is left."""
    run, reference = RunDir(run_dir), RunDir(reference_dir)
    assert_same_checkpoint(run.latest, reference.latest)
    assert finetune_metrics(Path(f"{run_dir}.json")) == finetune_metrics(Path(f"{reference_dir}.json"))
    assert [p.name for p in run.checkpoints.iterdir()] == [run.latest.name]
    assert not list(Path(run_dir).glob("checkpoints.superseded-*"))
