"""The training engine end to end on CPU: it learns, resumes exactly, and is deterministic."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mugs.config import Config
from mugs.launch.jobs import Pretraining
from mugs.launch.local import launch_local
from mugs.model import update_memories
from mugs.rundir import RunDir
from mugs.testing.compare import assert_same
from mugs.testing.configs import tiny_training_config
from mugs.testing.synthetic import SyntheticImages
from mugs.training import checkpoint as ckpt
from mugs.training.checkpoint import incompatible_keys
from mugs.training.engine import NonFiniteLossError, Trainer
from mugs.training.pretrain import run_pretraining, set_aside_if_changed

MEAN_STD = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
DATASET = SyntheticImages(size=24, side=20)  # 3 iterations per epoch at batch 8


def tiny_config(output_dir: Path, *overrides: str) -> Config:
    return tiny_training_config(output_dir, None, *overrides)


def train(output_dir: Path, *overrides: str):
    return run_pretraining(
        tiny_config(output_dir, *overrides), dataset=DATASET, mean_std=MEAN_STD, progress=False
    )


def final_state(output_dir: Path) -> dict:
    return ckpt.load_checkpoint(RunDir(output_dir).latest)


def assert_states_identical(a: dict, b: dict) -> None:
    """Every tensor, optimizer and RNG states included; the configs differ in train.output_dir alone."""
    a, b = dict(a), dict(b)
    assert incompatible_keys(a.pop("config"), b.pop("config")) == []
    assert_same(a, b, "checkpoint")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("straight")
    result = train(output_dir)
    assert result.status == "finished" and result.global_iteration == 6
    return output_dir


def test_training_is_finite_and_moves_the_teacher(straight_run: Path) -> None:
    log = [json.loads(line) for line in (straight_run / "log.jsonl").read_text().splitlines()]
    iterations = [r for r in log if r["type"] == "iteration"]
    assert [r["global_iteration"] for r in iterations] == [1, 2, 3, 4, 5, 6]
    for record in iterations:
        for key in ("loss", "instance", "local_group", "group", "teacher_feature_std", "effective_rank"):
            assert torch.isfinite(torch.tensor(record[key])), (key, record)
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]

    torch.manual_seed(0)
    initial = Trainer(tiny_config(straight_run / "unused"), DATASET, mean_std=MEAN_STD)
    trained = final_state(straight_run)
    moved = [
        name
        for name, value in initial.teacher.state_dict().items()
        if "memory" not in name and not torch.equal(value, trained["teacher"][name])
    ]
    assert "backbone.blocks.0.attn.qkv.weight" in moved and "group_head.projector.0.weight" in moved
    # the memories were written: the pointer moved past the initial rows
    assert int(trained["teacher"]["memory.pointer"]) == 6 * 8 % 40


def test_kept_checkpoints_and_plain_data(straight_run: Path) -> None:
    kept = RunDir(straight_run).kept_checkpoints()
    assert [epoch for epoch, _ in kept] == [1, 2]
    payload = torch.load(kept[0][1], weights_only=True)  # no pickled objects anywhere
    assert payload["epoch"] == 1 and payload["iteration_in_epoch"] == 0 and payload["global_iteration"] == 3
    assert payload["config"]["optim"]["batch_size"] == 8
    assert (straight_run / "DONE").exists()


def test_rerunning_a_finished_run_restores_its_marker_and_trains_nothing(tmp_path: Path) -> None:
    train(tmp_path)
    latest = RunDir(tmp_path).latest.read_bytes()
    log = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "DONE").unlink()  # Snakemake removes a job's outputs before it reruns the job
    result = train(tmp_path)
    assert (result.status, result.global_iteration) == ("finished", 6)
    assert json.loads((tmp_path / "DONE").read_text()) == {"global_iteration": 6}
    assert RunDir(tmp_path).latest.read_bytes() == latest
    assert (tmp_path / "log.jsonl").read_text() == log


def test_same_seed_gives_bit_identical_checkpoints(straight_run: Path, tmp_path: Path) -> None:
    train(tmp_path)
    assert_states_identical(final_state(straight_run), final_state(tmp_path))
    assert (straight_run / "log.jsonl").read_text().count("loss") == (
        tmp_path / "log.jsonl"
    ).read_text().count("loss")


def test_different_seed_differs(straight_run: Path, tmp_path: Path) -> None:
    train(tmp_path, "train.seed=1")
    with pytest.raises(AssertionError):
        assert_states_identical(final_state(straight_run), final_state(tmp_path))


def test_resume_mid_epoch_is_bit_identical(straight_run: Path, tmp_path: Path) -> None:
    first = train(tmp_path, "train.max_iterations=4")  # stops inside the second epoch
    assert first.status == "stopped" and first.global_iteration == 4
    stopped = final_state(tmp_path)
    assert (stopped["epoch"], stopped["iteration_in_epoch"]) == (1, 1)
    second = train(tmp_path)
    assert second.status == "finished" and second.global_iteration == 6
    assert_states_identical(final_state(straight_run), final_state(tmp_path))

    # the log of the resumed run reads like the uninterrupted one
    def losses(directory: Path) -> list[float]:
        lines = (directory / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"iteration"' in line]

    assert losses(tmp_path) == losses(straight_run)


def test_resume_refuses_a_changed_configuration(straight_run: Path, tmp_path: Path) -> None:
    train(tmp_path, "train.max_iterations=2")
    with pytest.raises(ValueError, match=r"optim\.lr"):
        train(tmp_path, "optim.lr=0.1")
    saved = {"train": {"seed": 1, "num_workers": 0}, "optim": {"lr": 1}}
    assert incompatible_keys(saved, {"train": {"seed": 1, "num_workers": 8}, "optim": {"lr": 1}}) == []
    assert incompatible_keys(saved, {"train": {"seed": 2, "num_workers": 0}, "optim": {"lr": 2}}) == [
        "optim.lr",
        "train.seed",
    ]


def test_a_key_added_to_the_schema_after_a_checkpoint_counts_as_its_default() -> None:
    # a checkpoint from before augment.backend existed trained with what is now its default
    current = Config().to_dict()
    saved = copy.deepcopy(current)
    del saved["augment"]["backend"]
    assert incompatible_keys(saved, current) == []
    current["augment"]["backend"] = "device"
    assert incompatible_keys(saved, current) == ["augment.backend"]


# the bad step is found by the next log line, or (with no log line due) by the epoch-end checkpoint;
# the log keeps the lines of the good steps only (global_iteration counts finished steps)
@pytest.mark.parametrize(("log_every", "found_after", "last_line"), [(1, 5, 4), (10, 6, 3)])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch, log_every: int, found_after: int, last_line: int
) -> None:
    train(tmp_path, "train.max_iterations=3")
    latest = RunDir(tmp_path).latest
    before = latest.read_bytes()

    original = Trainer.train_step

    def poisoned(self, crops, weak_flags):
        # only iteration 4's input is poisoned; the NaN weights it leaves make iteration 5 bad too,
        # and the error must still name 4
        crops = [torch.full_like(c, float("nan")) for c in crops] if self.global_iteration == 4 else crops
        return original(self, crops, weak_flags)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(
        NonFiniteLossError, match=rf"global iteration 4 .*found after {found_after} "
    ) as error:
        train(tmp_path, f"train.log_every={log_every}")
    assert error.value.iteration == 4 and error.value.epoch == 1
    assert set(error.value.losses) == {"loss", "instance", "local_group", "group"}
    assert math.isnan(error.value.losses["loss"])
    assert latest.read_bytes() == before
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    logged = [json.loads(line)["global_iteration"] for line in lines]
    assert max(logged) == last_line
    assert not (tmp_path / "DONE").exists()


# Operations that read a tensor's value on the host, or whose result size depends on the data: on a
# GPU each makes the host wait for the device. On CPU nothing waits, so the test looks for the
# operations themselves.
_HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,  # item(), bool(), float(), int()
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.repeat_interleave.Tensor,
}
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


class _NoHostReads(TorchDispatchMode):
    """Fails on any host read of a tensor other than ``host_tensors`` (data that lives on the host)."""

    def __init__(self, host_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.host_tensors = host_tensors
        self.paused = False

    def _tensors(self, args) -> list[torch.Tensor]:
        flat = []
        for arg in args:
            flat.extend(arg if isinstance(arg, (list, tuple)) else [arg])
        return [a for a in flat if isinstance(a, torch.Tensor)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = self._tensors(args)
        reads = func in _HOST_READS or (
            func in _INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:])
        )
        if reads and not self.paused and not any(t is h for t in tensors for h in self.host_tensors):
            raise AssertionError(f"{func} reads the device on the host")
        return func(*args, **(kwargs or {}))


def _refuse(name: str):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} reads the device on the host")

    return refuse


@pytest.mark.parametrize("pointer", ["fixed", "official"])
def test_train_step_never_waits_for_the_device(tmp_path: Path, monkeypatch, pointer: str) -> None:
    trainer = Trainer(tiny_config(tmp_path, f"loss.memory_pointer={pointer}"), DATASET, mean_std=MEAN_STD)
    batch = next(iter(trainer.loader))
    crops, weak = trainer.finish_crops(batch), batch.weak_flags
    assert weak.any() and not weak.all()  # both kinds of rows, so the memory update is exercised
    guard = _NoHostReads(host_tensors=[weak])  # the loader's flags are host data by construction
    with guard, pytest.raises(AssertionError, match="_local_scalar_dense"):
        bool(torch.ones(()))  # the guard is armed

    # AdamW (foreach) reads its step counters, which it keeps on the host; fused AdamW, used on
    # CUDA, keeps them on the device and reads nothing
    step = trainer.optimizer.step

    def optimizer_step():
        guard.paused = True
        try:
            return step()
        finally:
            guard.paused = False

    monkeypatch.setattr(trainer.optimizer, "step", optimizer_step)
    for _ in range(2):  # the second step reads the memories and queues the first one wrote
        with monkeypatch.context() as patches:
            for name in ("tolist", "numpy", "__array__"):
                patches.setattr(torch.Tensor, name, _refuse(name))
            with guard:
                losses = trainer.train_step(crops, weak)
        trainer.global_iteration += 1
        assert torch.isfinite(losses["loss"])
    assert int(trainer.student.memory.pointer) != 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cpu", "device"])
def test_train_step_never_waits_for_the_gpu(tmp_path: Path, backend: str) -> None:
    config = tiny_config(tmp_path, "train.device=cuda", f"augment.backend={backend}")
    trainer = Trainer(config, DATASET, mean_std=MEAN_STD)
    batches = iter(trainer.loader)
    batch = next(batches)
    trainer.train_step(trainer.finish_crops(batch), batch.weak_flags)  # the first creates AdamW's state
    trainer.global_iteration += 1
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for _ in range(2):  # finishing the crops on the device included (rendering them, with device)
            batch = next(batches)
            trainer.train_step(trainer.finish_crops(batch), batch.weak_flags)
            trainer.global_iteration += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.check_finite()


def test_weak_flagged_rows_fill_the_student_memory_in_order(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path), DATASET, mean_std=MEAN_STD)
    dim = trainer.student.memory.dim
    student = torch.arange(8 * dim, dtype=torch.float32).view(8, dim)
    weak = torch.tensor([True, False, True, True, False, False, False, True])
    networks = trainer.student, trainer.teacher
    update_memories(*networks, student, -student, weak, None)
    update_memories(*networks, student + 1000, -student, torch.zeros(8, dtype=torch.bool), None)
    memory = trainer.student.memory
    assert int(memory.pointer) == 4
    assert torch.equal(memory.values[:4], student[[0, 2, 3, 7]])
    assert torch.equal(memory.search_keys[:4], student[[0, 2, 3, 7]])
    assert int(trainer.teacher.memory.pointer) == 16
    assert torch.equal(trainer.teacher.memory.values[:16], torch.cat([-student, -student]))


def test_two_gloo_processes_match_one_process(straight_run: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.max_iterations=3")
    result = launch_local(config, nprocs=2, job=Pretraining(DATASET, MEAN_STD), progress=False)
    assert result.status == "stopped" and result.global_iteration == 3

    def losses(directory: Path) -> list[dict]:
        lines = (directory / "log.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"iteration"' in line][:3]

    for single, double in zip(losses(straight_run), losses(tmp_path), strict=True):
        for key in ("loss", "instance", "local_group", "group"):
            assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


def test_changed_settings_set_the_old_run_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "pretrain"
    train(run_dir, "train.max_iterations=1")
    assert set_aside_if_changed(tiny_config(run_dir, "train.log_every=5")) is None  # no effect on results
    moved = set_aside_if_changed(tiny_config(run_dir, "optim.lr=0.1"))
    assert moved is not None and moved.name.startswith("pretrain.superseded-")
    assert RunDir(moved).latest.exists() and not run_dir.exists()
