"""Bad values and arguments, table-driven: each ends in exit code 2 and one line naming the culprit
(key, file or value), without a traceback, and leaves every file that was there as it was.

Every case runs the real command line on a directory of small fixtures: a tiny checkpoint, one whose
weights do not fit its recorded architecture, a truncated one, a torch file that pickles an object,
a text file and a JPEG, links to the checkpoint, a finished metrics file, a file and a directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mugs.cli import main
from mugs.model import build_networks
from mugs.testing.configs import tiny_training_config
from mugs.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-values")
    config = tiny_training_config(
        root / "run", {"model": {"depth": 2}, "evaluate": {"linear_n_last_blocks": 1}}
    )
    student, teacher = build_networks(config)
    payload = {
        "format": ckpt.FORMAT,
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "epoch": 1,
        "config": config.to_dict(),
    }
    ckpt.atomic_save(payload, root / "good.pt")
    recorded = config.to_dict()
    recorded["model"]["depth"] = 3  # the weights have two blocks
    ckpt.atomic_save({**payload, "config": recorded}, root / "mismatch.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"args": argparse.Namespace(arch="vit_small"), "epoch": 1}, root / "args.pt")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    (root / "link.pt").symlink_to("good.pt")
    os.link(root / "good.pt", root / "hard.pt")
    (root / "knn.json").write_text('{"finished": true}\n')
    (root / "afile").write_text("a plain file\n")
    (root / "adir").mkdir()
    (root / "params.yaml").write_text("optim: {epochs: 2}\n")
    (root / "bad-momentum.yaml").write_text("optim: {momentum_teacher: 2}\n")
    (root / "broken.yaml").write_text("optim: {lr: [1,\n")
    (root / "badrun" / "checkpoints").mkdir(parents=True)
    (root / "badrun" / "checkpoints" / "epoch0001.pt").write_bytes(data[:1000])
    (root / "emptyrun").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content's SHA-256 (directories and links as such)."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = "link to " + os.readlink(path)
        elif path.is_dir():
            state[name] = "directory"
        else:
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


PRETRAIN = ["pretrain", "--preset", "demo", "--no-progress", "--set"]

# An output where nothing can be created (for root too, whom permission bits do not stop): every
# command that writes refuses it before any work, naming the path given, never a temporary file's.
UNWRITABLE = "/proc/mugs-no-such-output"

# (arguments, what the message must name); every case exits with 2
CASES = [
    # ranges of single values
    ([*PRETRAIN, "optim.lr=-0.1"], ["optim.lr", "-0.1"]),
    ([*PRETRAIN, "optim.momentum_teacher=1.5"], ["optim.momentum_teacher", "1.5"]),
    ([*PRETRAIN, "optim.weight_decay=-0.01"], ["optim.weight_decay", "-0.01"]),
    ([*PRETRAIN, "optim.weight_decay_end=-1"], ["optim.weight_decay_end"]),
    ([*PRETRAIN, "optim.clip_grad=-1"], ["optim.clip_grad", "-1"]),
    ([*PRETRAIN, "optim.min_lr=-1e-6"], ["optim.min_lr"]),
    ([*PRETRAIN, "optim.epochs=0"], ["optim.epochs", "0"]),
    ([*PRETRAIN, "optim.batch_size=0"], ["optim.batch_size"]),
    ([*PRETRAIN, "optim.lr=.nan"], ["optim.lr", "nan"]),
    ([*PRETRAIN, "optim.patch_embed_lr_mult=-0.2"], ["optim.patch_embed_lr_mult"]),
    ([*PRETRAIN, "model.drop_path_rate=1.0"], ["model.drop_path_rate", "1.0"]),
    ([*PRETRAIN, "model.patch_size=0"], ["model.patch_size"]),
    ([*PRETRAIN, "model.out_dim=0"], ["model.out_dim"]),
    ([*PRETRAIN, "data.train_subset=-5"], ["data.train_subset", "-5"]),
    ([*PRETRAIN, "data.val_fraction=1.0"], ["data.val_fraction"]),
    ([*PRETRAIN, "train.checkpoint_every=-1"], ["train.checkpoint_every", "-1"]),
    ([*PRETRAIN, "train.keep_every_epochs=-2"], ["train.keep_every_epochs", "-2"]),
    ([*PRETRAIN, "train.max_iterations=0"], ["train.max_iterations", "0"]),
    ([*PRETRAIN, "train.seed=-1"], ["train.seed"]),
    ([*PRETRAIN, "train.threads=0"], ["train.threads"]),
    ([*PRETRAIN, "loss.instance_temp=0"], ["loss.instance_temp"]),
    ([*PRETRAIN, "loss.group_teacher_temp=-0.04"], ["loss.group_teacher_temp"]),
    ([*PRETRAIN, "augment.weak_prob=1.5"], ["augment.weak_prob", "1.5"]),
    ([*PRETRAIN, "augment.erasing_prob=-0.1"], ["augment.erasing_prob"]),
    ([*PRETRAIN, "augment.n_local=-1"], ["augment.n_local"]),
    ([*PRETRAIN, "evaluate.knn_k=[10, 0]"], ["evaluate.knn_k", "0"]),
    ([*PRETRAIN, "evaluate.knn_temperature=0"], ["evaluate.knn_temperature"]),
    ([*PRETRAIN, "evaluate.fewshot_fractions=[0.0]"], ["evaluate.fewshot_fractions"]),
    ([*PRETRAIN, "finetune.label_smoothing=1.0"], ["finetune.label_smoothing"]),
    ([*PRETRAIN, "finetune.layer_decay=0"], ["finetune.layer_decay"]),
    ([*PRETRAIN, "launch.nprocs=0"], ["launch.nprocs"]),
    ([*PRETRAIN, "launch.poll_seconds=0"], ["launch.poll_seconds"]),
    # types, keys and combinations
    ([*PRETRAIN, "optim.lr=fast"], ["optim.lr", "fast"]),
    ([*PRETRAIN, "optim.lrr=1"], ["optim.lrr"]),
    ([*PRETRAIN, "optim.warmup_epochs=5"], ["optim.warmup_epochs", "optim.epochs"]),
    ([*PRETRAIN, "augment.global_scale=[0.5, 0.2]"], ["augment.global_scale"]),
    ([*PRETRAIN, "augment.local_size=15"], ["augment.local_size", "model.patch_size"]),
    ([*PRETRAIN, "data.train_subset=10"], ["data.train_subset", "optim.batch_size"]),
    # the command line
    ([*PRETRAIN, "optim.lr=[1,"], ["optim.lr", "[1,"]),
    ([*PRETRAIN, "optim.lr"], ["optim.lr"]),
    (["pretrain", "--preset", "demo", "--nprocs", "0"], ["--nprocs", "0"]),
    (["pretrain", "--preset", "demo", "--nprocs", "-2"], ["--nprocs", "-2"]),
    (["pretrain", "--preset", "nosuch"], ["nosuch"]),
    (["presets", "nosuch"], ["nosuch"]),
    (["pretrain", "--run", "demo"], ["--run"]),
    (["pretrain", "--preset", "demo", "--output-dir", "afile"], ["afile"]),
    # --preset with --config works: what fails is the value set on top
    (
        ["pretrain", "--preset", "demo", "--config", "params.yaml", "--set", "train.max_iterations=0"],
        ["params.yaml", "train.max_iterations"],
    ),
    (["pretrain", "--config", "bad-momentum.yaml"], ["bad-momentum.yaml", "optim.momentum_teacher", "2"]),
    (["pretrain", "--config", "missing.yaml"], ["missing.yaml"]),
    (["pretrain", "--config", "broken.yaml"], ["broken.yaml"]),
    # checkpoints
    (["knn", "missing.pt", "--out", "out.json"], ["missing.pt"]),
    (["knn", "truncated.pt", "--out", "out.json"], ["truncated.pt"]),
    (["knn", "notes.txt", "--out", "out.json"], ["notes.txt"]),
    (["knn", "mismatch.pt", "--out", "out.json"], ["mismatch.pt", "blocks.2"]),
    (["knn", "good.pt", "--out", "out.json", "--set", "evaluate.network=nobody"], ["evaluate.network"]),
    (["linear", "args.pt", "--out", "out.json"], ["args.pt", "import-official"]),
    (["fewshot", "photo.jpg", "--out", "out.json"], ["photo.jpg"]),
    (["features", "truncated.pt"], ["truncated.pt"]),
    (["finetune", "mismatch.pt", "--out", "out.json"], ["mismatch.pt", "blocks.2"]),
    (["select", "badrun"], ["epoch0001.pt"]),
    (["select", "emptyrun"], ["emptyrun"]),
    (["export", "truncated.pt", "out.pt"], ["truncated.pt"]),
    (["export", "adir", "out.pt"], ["adir"]),
    (["import-official", "truncated.pt", "out.pt"], ["truncated.pt", "not a PyTorch checkpoint"]),
    (["import-official", "notes.txt", "out.pt"], ["notes.txt", "not a PyTorch checkpoint"]),
    (["import-official", "photo.jpg", "out.pt"], ["photo.jpg", "not a PyTorch checkpoint"]),
    (["import-official", "args.pt", "out.pt"], ["args.pt", "--trust-pickle"]),
    # outputs
    (["export", "good.pt", "good.pt"], ["good.pt"]),
    (["export", "good.pt", "link.pt"], ["link.pt", "good.pt"]),
    (["export", "good.pt", "hard.pt"], ["hard.pt", "good.pt"]),
    (["export", "good.pt", "adir"], ["adir"]),
    (["export", "good.pt", "afile/backbone.pt"], ["afile"]),
    (["import-official", "args.pt", "args.pt"], ["args.pt"]),
    (["knn", "good.pt", "--out", "good.pt"], ["good.pt"]),
    (["knn", "good.pt", "--out", "adir"], ["adir"]),
    (["linear", "good.pt", "--out", "afile/linear.json"], ["afile"]),
    (["report", "--runs", "emptyrun", "--out", "afile"], ["afile"]),
    (["prepare", "--preset", "demo", "--set", "data.prepared_dir=afile"], ["afile"]),
    (["demo-data", "--preset", "demo", "--dest", "afile"], ["afile"]),
    (["features", "good.pt", "--set", "evaluate.cache_dir=afile"], ["afile"]),
    # unwritable outputs, one per command that writes
    (["export", "good.pt", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    (["import-official", "args.pt", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    (["knn", "good.pt", "--out", f"{UNWRITABLE}.json"], [f"cannot write {UNWRITABLE}.json"]),
    (["linear", "good.pt", "--out", f"{UNWRITABLE}.json"], [f"cannot write {UNWRITABLE}.json"]),
    (["fewshot", "good.pt", "--out", f"{UNWRITABLE}.json"], [f"cannot write {UNWRITABLE}.json"]),
    (["finetune", "good.pt", "--out", f"{UNWRITABLE}.json"], [f"cannot write {UNWRITABLE}.json"]),
    (["features", "good.pt", "--set", f"evaluate.cache_dir={UNWRITABLE}"], [f"cannot write {UNWRITABLE}"]),
    (["select", "badrun", "--out-dir", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    (["report", "--runs", "emptyrun", "--out", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    (["init-checkpoint", "--preset", "demo", "--out", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    (
        ["raw-pixel-knn", "--preset", "demo", "--out", f"{UNWRITABLE}.json"],
        [f"cannot write {UNWRITABLE}.json"],
    ),
    (
        ["prepare", "--preset", "demo", "--set", f"data.prepared_dir={UNWRITABLE}"],
        [f"cannot write {UNWRITABLE}"],
    ),
    (["demo-data", "--preset", "demo", "--dest", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
    ([*PRETRAIN[:-1], "--output-dir", UNWRITABLE], [f"cannot write {UNWRITABLE}"]),
]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse
        return stop.code


@pytest.mark.parametrize(("argv", "named"), CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_is_one_line_naming_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv, named
) -> None:
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and ".tmp" not in err  # never a temporary file's name
    assert len(err.strip().splitlines()) == 1, err
    for culprit in named:
        assert culprit in err, f"{culprit!r} not named in: {err}"
    if "--trust-pickle" not in named:
        assert "--trust-pickle" not in err  # only a pickle that needs it gets that advice
    assert snapshot(workdir) == before


# through the installed interpreter, as a user runs it: nothing but the one line on stderr
SUBPROCESS_CASES = [
    (["export", "good.pt", "good.pt"], "good.pt"),
    (["knn", "mismatch.pt", "--out", "out.json"], "mismatch.pt"),
    (["pretrain", "--preset", "demo", "--set", "optim.lr=[1,"], "optim.lr"),
]


@pytest.mark.parametrize(("argv", "named"), SUBPROCESS_CASES, ids=[" ".join(a) for a, _ in SUBPROCESS_CASES])
def test_a_user_sees_one_line_and_exit_code_2(workdir: Path, argv: list[str], named: str) -> None:
    before = snapshot(workdir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "40"}  # a narrow terminal must not wrap it
    done = subprocess.run(
        [sys.executable, "-m", "mugs.cli", *argv], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert named in done.stderr
    assert snapshot(workdir) == before


def test_debug_shows_the_traceback(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    assert run_cli(["--debug", "export", "good.pt", "good.pt"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "check_output" in err
    assert err.strip().splitlines()[-1].startswith("error: good.pt")
