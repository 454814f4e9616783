"""Importing checkpoints in the authors' published layout, and exporting a backbone for timm."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from mugs.config import config_from_dict
from mugs.files import OutputError
from mugs.interop import (
    OfficialCheckpointError,
    export_backbone,
    import_official_checkpoint,
    timm_model_name,
)
from mugs.losses import MugsObjective
from mugs.model import build_networks
from mugs.training import checkpoint as ckpt

GAIN, DIRECTION = (
    "group_head.last_layer.parametrizations.weight.original0",
    "group_head.last_layer.parametrizations.weight.original1",
)
TINY = {
    "model": {
        "arch": "vit_tiny",
        "patch_size": 4,
        "hidden_dim": 32,
        "out_dim": 16,
        "predictor_hidden_dim": 24,
        "group_out_dim": 40,
    },
    "loss": {"instance_queue_size": 48, "local_group_queue_size": 32, "local_group_knn_top_n": 8},
    "augment": {"global_size": 16, "local_size": 8, "n_local": 2},
}


def official_network(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Our network state in the official naming (no memory; old-style weight norm)."""
    renamed = {GAIN: "group_head.last_layer.weight_g", DIRECTION: "group_head.last_layer.weight_v"}
    return {
        prefix + renamed.get(key, key): value.clone()
        for key, value in state.items()
        if not key.startswith("memory.")
    }


def official_memory(memory) -> dict[str, torch.Tensor]:
    return {
        "block.queue_q": memory.search_keys.clone(),
        "block.queue_k": memory.values.clone(),
        "block.queue_v": torch.randn_like(memory.values),  # written like the others, never read
        "block.queue_ptr": memory.pointer.clone(),
    }


@pytest.fixture(scope="module")
def original():
    """Randomly initialised networks and losses with distinct student/teacher weights and pointers."""
    torch.manual_seed(0)
    config = config_from_dict(TINY)
    student, teacher = build_networks(config)
    losses = MugsObjective.from_config(config).losses
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        for network in (student, teacher):
            # trained gains move away from 1, so the importer must infer norm_last_layer False
            network.group_head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
        student.memory.pointer.fill_(10)
        teacher.memory.pointer.fill_(6)
        losses["instance"].queue_pointer.fill_(5)
        losses["local_group"].queue_pointer.fill_(9)
        losses["group"].center.normal_()
    student.eval()
    teacher.eval()
    return student, teacher, losses


@pytest.fixture(scope="module")
def official(original) -> dict:
    student, teacher, losses = original
    return {
        "student": official_network(student.state_dict(), "module."),
        "teacher": official_network(teacher.state_dict(), ""),
        "student_mem": official_memory(student.memory),
        "teacher_mem": official_memory(teacher.memory),
        "instance-sup.": {
            "queue": losses["instance"].queue.clone(),
            "queue_ptr": losses["instance"].queue_pointer.clone(),
        },
        "local-group-sup.": {
            "queue": losses["local_group"].queue.clone(),
            "queue_ptr": losses["local_group"].queue_pointer.clone(),
        },
        "group-sup.": {"center": losses["group"].center.clone()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 7,
    }


@pytest.fixture(scope="module")
def imported(official, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("import")
    source = directory / "checkpoint.pth"
    torch.save(official, source)
    out = import_official_checkpoint(source, directory / "imported.pt")
    return source, ckpt.load_checkpoint(out)


def write(payload: dict, path: Path) -> Path:
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def rebuilt(imported):
    """Networks built from the imported config that hold nothing but the imported state."""
    payload = imported[1]
    with torch.device("meta"):  # no storage: a tensor the import failed to provide cannot compute
        student, teacher = build_networks(config_from_dict(payload["config"]))
    student.load_state_dict(payload["student"], assign=True)
    teacher.load_state_dict(payload["teacher"], assign=True)
    return student.eval(), teacher.eval()


def test_import_puts_every_tensor_in_its_place(original, official, imported):
    student, teacher, losses = original
    source, payload = imported
    for name, network in (("student", student), ("teacher", teacher)):
        expected = network.state_dict()
        assert payload[name].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(payload[name][key], value), f"{name}.{key}"
    # queue_q is searched and queue_k returned; queue_v has no place
    assert torch.equal(payload["teacher"]["memory.search_keys"], official["teacher_mem"]["block.queue_q"])
    assert torch.equal(payload["teacher"]["memory.values"], official["teacher_mem"]["block.queue_k"])
    assert payload["student"]["memory.pointer"].tolist() == [10]
    assert payload["teacher"]["memory.pointer"].tolist() == [6]
    assert payload["losses"].keys() == {"instance", "local_group", "group"}
    assert torch.equal(payload["losses"]["instance"]["queue"], official["instance-sup."]["queue"])
    assert torch.equal(payload["losses"]["local_group"]["queue"], official["local-group-sup."]["queue"])
    assert payload["losses"]["instance"]["queue_pointer"].tolist() == [5]
    assert payload["losses"]["local_group"]["queue_pointer"].tolist() == [9]
    assert torch.equal(payload["losses"]["group"]["center"], losses["group"].center)

    assert payload["epoch"] == 7 and payload["iteration_in_epoch"] == 0
    assert payload["optimizer"] is None and payload["scaler"] is None and payload["rng"] is None
    assert payload["global_iteration"] is None and payload["iterations_per_epoch"] is None
    assert payload["imported_from"] == str(source)


def test_import_infers_the_config_from_the_shapes(imported):
    config = config_from_dict(imported[1]["config"])
    model, loss = config.model, config.loss
    assert (model.arch, model.patch_size, config.augment.global_size) == ("vit_tiny", 4, 16)
    assert (model.hidden_dim, model.out_dim, model.predictor_hidden_dim) == (32, 16, 24)
    assert model.group_out_dim == 40 and model.use_bn_in_head is False
    assert model.norm_last_layer is False  # the gains are not all 1
    assert (loss.instance_queue_size, loss.local_group_queue_size) == (48, 32)
    assert loss.local_group_knn_top_n == 8  # not in the shapes: the published value
    assert (loss.instance_weight, loss.local_group_weight, loss.group_weight) == (1.0, 1.0, 1.0)


def test_imported_memory_returns_the_old_queue_k_rows(official, rebuilt):
    _, teacher = rebuilt
    queue_q, queue_k = official["teacher_mem"]["block.queue_q"], official["teacher_mem"]["block.queue_k"]
    # a query equal to a stored search row finds that row first, and gets its queue_k row back
    found = teacher.memory.retrieve(queue_q[[3, 17]])
    assert torch.equal(found[:, 0], queue_k[[3, 17]])
    query = torch.randn(5, queue_q.shape[1])
    cosine = F.normalize(query, dim=-1) @ F.normalize(queue_q, dim=-1).T
    expected = queue_k[cosine.topk(teacher.memory.top_n, dim=-1).indices]
    assert torch.equal(teacher.memory.retrieve(query), expected)


def test_imported_networks_compute_what_the_originals_computed(original, rebuilt):
    student, teacher, _ = original
    new_student, new_teacher = rebuilt
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    with torch.no_grad():
        assert torch.equal(
            new_teacher.backbone.forward_features(crops[0]), teacher.backbone.forward_features(crops[0])
        )
        for new, old in ((new_teacher, teacher), (new_student, student)):
            a, b = new(crops), old(crops)
            for field in ("instance", "local_group", "group", "cls", "memory_feature"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_pickled_args_need_trust(official, tmp_path):
    args = argparse.Namespace(
        arch="vit_tiny",
        epochs=50,
        instance_temp=0.1,
        local_group_knn_top_n=3,
        batch_size_per_gpu=4,
        world_size=2,
        size_crops=[8],
        loss_weights=[1.0, 0.5, 2.0],
        use_fp16=False,
    )
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    source = write({**official, "args": args, "fp16_scaler": scaler}, tmp_path / "with_args.pth")
    with pytest.raises(OfficialCheckpointError, match=r"argparse `args`.*--trust-pickle"):
        import_official_checkpoint(source, tmp_path / "untrusted.pt")
    assert not (tmp_path / "untrusted.pt").exists()

    out = import_official_checkpoint(source, tmp_path / "trusted.pt", trust_pickle=True)
    payload = ckpt.load_checkpoint(out)
    assert payload["scaler"] == scaler
    config = config_from_dict(payload["config"])
    assert config.optim.precision == "fp16"  # the file has a scaler
    assert (config.optim.epochs, config.optim.batch_size, config.augment.local_size) == (50, 8, 8)
    assert (config.loss.instance_temp, config.loss.local_group_knn_top_n) == (0.1, 3)
    assert (config.loss.instance_weight, config.loss.local_group_weight, config.loss.group_weight) == (
        1,
        0.5,
        2,
    )


def _drop(payload: dict, section: str, key: str) -> dict:
    return {**payload, section: {k: v for k, v in payload[section].items() if k != key}}


def _add(payload: dict, section: str, key: str) -> dict:
    return {**payload, section: {**payload[section], key: torch.zeros(1)}}


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda p: _drop(p, "teacher", "backbone.norm.weight"), "backbone.norm.weight"),
        (lambda p: _drop(p, "student", "module.instance_head.predictor.2.weight"), "predictor.2.weight"),
        (lambda p: _drop(p, "student_mem", "block.queue_k"), "memory.values"),
        (lambda p: _add(p, "student", "module.backbone.extra"), "student['module.backbone.extra']"),
        (lambda p: _add(p, "teacher_mem", "block.queue_z"), "teacher_mem['block.queue_z']"),
        (lambda p: _add(p, "group-sup.", "spread"), "group-sup.['spread']"),
        (lambda p: {**p, "ema": {}}, "'ema'"),
        (lambda p: {k: v for k, v in p.items() if k != "group-sup."}, "'group-sup.'"),
    ],
)
def test_missing_or_unknown_entries_are_named(official, tmp_path, edit, named):
    source = write(edit(official), tmp_path / "edited.pth")
    with pytest.raises(OfficialCheckpointError) as error:
        import_official_checkpoint(source, tmp_path / "out.pt")
    assert named in str(error.value)
    assert not (tmp_path / "out.pt").exists()


def test_misshapen_entry_and_wrong_arch_are_errors(official, tmp_path):
    center = {"center": torch.zeros(1, 41)}
    source = write({**official, "group-sup.": center}, tmp_path / "misshapen.pth")
    with pytest.raises(OfficialCheckpointError, match=r"group-sup.\['center'\] has shape \(1, 41\)"):
        import_official_checkpoint(source, tmp_path / "out.pt")
    source = write(official, tmp_path / "plain.pth")
    with pytest.raises(OfficialCheckpointError, match="vit_small given, but the weights are a vit_tiny"):
        import_official_checkpoint(source, tmp_path / "out.pt", arch="vit_small")


def test_disabled_supervision_skips_its_unused_entries(official, tmp_path):
    # the official code keeps relation block, memories and loss buffers even with weight 0
    without_local_group = {
        **official,
        "student": {k: v for k, v in official["student"].items() if "local_group_head" not in k},
        "teacher": {k: v for k, v in official["teacher"].items() if "local_group_head" not in k},
    }
    out = import_official_checkpoint(write(without_local_group, tmp_path / "no_lg.pth"), tmp_path / "o.pt")
    payload = ckpt.load_checkpoint(out)
    assert payload["config"]["loss"]["local_group_weight"] == 0.0
    assert payload["losses"].keys() == {"instance", "group"}
    assert not any(k.startswith(("memory.", "backbone.relation_blocks.")) for k in payload["teacher"])
    assert torch.equal(
        payload["teacher"]["backbone.norm.weight"], official["teacher"]["backbone.norm.weight"]
    )


@pytest.fixture(scope="module")
def exported(official, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Backbones exported from an import of the published layout: network -> (imported, blob)."""
    directory = tmp_path_factory.mktemp("export")
    imported = import_official_checkpoint(
        write(official, directory / "checkpoint.pth"), directory / "imported.pt"
    )
    return {
        network: (
            imported,
            torch.load(export_backbone(imported, directory / f"{network}.pt", network=network)),
        )
        for network in ("teacher", "student")
    }


def test_published_layout_to_timm_gives_identical_backbone_outputs(original, exported):
    """Import a checkpoint in the published layout, export its backbone, run it in stock timm."""
    imported, blob = exported["teacher"]
    assert (blob["arch"], blob["img_size"], blob["patch_size"], blob["embed_dim"]) == (
        "vit_tiny_patch16_224",
        16,
        4,
        192,
    )
    assert blob["network"] == "teacher" and blob["source"] == str(imported) and blob["epoch"] == 7
    model = timm.create_model(
        blob["arch"], num_classes=0, img_size=blob["img_size"], patch_size=blob["patch_size"]
    )
    model.load_state_dict(blob["state_dict"], strict=True)
    model.eval()

    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = original[1].backbone.forward_features(images)
        assert torch.equal(model.forward_features(images), expected)
        assert torch.equal(model(images), expected[:, 0])


def test_export_takes_the_chosen_network_without_the_relation_block(original, exported):
    student_backbone = original[0].backbone.state_dict()
    _, blob = exported["student"]
    assert blob["network"] == "student"
    expected = {k: v for k, v in student_backbone.items() if not k.startswith("relation_blocks.")}
    assert blob["state_dict"].keys() == expected.keys() and len(expected) < len(student_backbone)
    for key, value in expected.items():
        assert torch.equal(blob["state_dict"][key], value), key
    assert not torch.equal(blob["state_dict"]["pos_embed"], exported["teacher"][1]["state_dict"]["pos_embed"])


def test_timm_model_name_is_registered():
    assert timm_model_name("vit_small", 16, 224) == "vit_small_patch16_224"
    assert timm_model_name("vit_base", 8, 224) == "vit_base_patch8_224"
    # no registered name for patch 4 at 16 px: the patch-16 definition, overridden by the kwargs
    assert timm_model_name("vit_tiny", 4, 16) == "vit_tiny_patch16_224"


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("trust_pickle", [False, True])
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", lambda _: b"a text file\n", "not a PyTorch checkpoint"),
        ("photo.jpg", lambda _: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64), "not a PyTorch checkpoint"),
        ("empty.pth", lambda _: b"", "not a PyTorch checkpoint"),
        ("cut.pth", _truncated, "not a PyTorch checkpoint"),  # the zip directory sits at the end
        ("cut-legacy.pth", _truncated, "truncated or corrupt PyTorch checkpoint"),
    ],
)
def test_unpickling_is_advised_only_for_a_torch_file_that_needs_it(
    official, tmp_path, name, content, message, trust_pickle
):
    """A damaged or foreign file is named as such; the same release intact, pickling its `args`
    (in the zip or the pre-1.6 format), gets the --trust-pickle advice."""
    legacy = "legacy" in name
    plain, release = tmp_path / "plain.pth", tmp_path / "release.pth"
    torch.save(official, plain, _use_new_zipfile_serialization=not legacy)
    args = argparse.Namespace(arch="vit_tiny")
    torch.save({**official, "args": args}, release, _use_new_zipfile_serialization=not legacy)
    (tmp_path / name).write_bytes(content(plain))
    with pytest.raises(OfficialCheckpointError, match=rf"^{tmp_path / name} is .*{message}") as error:
        import_official_checkpoint(tmp_path / name, tmp_path / "out.pt", trust_pickle=trust_pickle)
    assert "--trust-pickle" not in str(error.value)
    assert not (tmp_path / "out.pt").exists()
    if trust_pickle:
        assert ckpt.load_checkpoint(
            import_official_checkpoint(release, tmp_path / "out.pt", trust_pickle=True)
        )
    else:
        with pytest.raises(OfficialCheckpointError, match=r"argparse `args`.*--trust-pickle"):
            import_official_checkpoint(release, tmp_path / "out.pt")


def test_export_refuses_to_overwrite_its_input_also_through_a_link(exported, tmp_path):
    imported, _ = exported["teacher"]
    before = imported.read_bytes()
    (tmp_path / "hard.pt").hardlink_to(imported)
    (tmp_path / "soft.pt").symlink_to(imported)
    for out in (imported, tmp_path / "hard.pt", tmp_path / "soft.pt"):
        with pytest.raises(OutputError, match=rf"^{out} is the input {imported}: refusing to overwrite it"):
            export_backbone(imported, out)
    assert imported.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.pt", "soft.pt"]  # no temporary file left
