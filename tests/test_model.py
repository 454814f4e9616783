"""Tests of the Mugs network: backbone, neighbour memory, heads and the assembled network."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mugs.config import ModelConfig
from mugs.model import (
    VIT_SIZES,
    GroupHead,
    MugsNetwork,
    MugsViT,
    NeighbourMemory,
    ProjectionPredictionHead,
    create_backbone,
    create_mugs_network,
)

TINY = dict(
    patch_size=4,
    hidden_dim=32,
    out_dim=16,
    predictor_hidden_dim=48,
    group_out_dim=64,
    drop_path_rate=0.0,
    norm_last_layer=True,
)
MODEL_KEYS = {field.name for field in dataclasses.fields(ModelConfig)}


def _net(monkeypatch: pytest.MonkeyPatch, student: bool = True, **overrides) -> MugsNetwork:
    # A two-block, 32-wide ViT keeps the network tests fast; the factory path is the real one.
    monkeypatch.setitem(VIT_SIZES, "vit_micro", (32, 2, 2))
    torch.manual_seed(0)
    model = {key: value for key, value in overrides.items() if key in MODEL_KEYS}
    others = {key: value for key, value in overrides.items() if key not in MODEL_KEYS}
    config = ModelConfig(**{**TINY, **model})
    config.arch = "vit_micro"  # a size only this test registers: outside the schema, set after validation
    return create_mugs_network(
        config,
        student=student,
        **{"img_size": 32, "memory_size": 32, "top_n": 4, **others},
    )


def _crops(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)
    ]


def _no_relation(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("relation_blocks.")}


# ---------------------------------------------------------------------------------------------- backbone


@pytest.fixture(scope="module")
def vit224() -> MugsViT:
    """A 224 px / patch 16 table (14 × 14 grid) with a very narrow, shallow body."""
    torch.manual_seed(0)
    return MugsViT(
        img_size=224, patch_size=16, embed_dim=8, depth=1, num_heads=2, relation_block=False
    ).eval()


def _dino_table(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    grid = pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / 14, (gw + 0.1) / 14), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


@pytest.mark.parametrize(("h", "w"), [(96, 96), (32, 32), (32, 64)])
def test_pos_embed_is_resampled_with_dino_scale_factor(vit224: MugsViT, h: int, w: int) -> None:
    gh, gw = h // 16, w // 16
    with torch.no_grad():
        table = vit224.interpolate_pos_encoding(torch.zeros(1, 1 + gh * gw, 8), h, w)
        expected = _dino_table(vit224.pos_embed, gh, gw)
        by_size = F.interpolate(
            vit224.pos_embed[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic"
        )
    assert table.shape == (1, 1 + gh * gw, 8)
    torch.testing.assert_close(table, expected, rtol=0, atol=0)
    assert torch.equal(table[:, 0], vit224.pos_embed[:, 0])
    # Resampling to a target size (timm's way) samples elsewhere; the scale factor must be what is used.
    assert (table[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, gh * gw, 8)).abs().max() > 1e-4


def test_pos_embed_identity_at_native_size(vit224: MugsViT) -> None:
    assert vit224.interpolate_pos_encoding(torch.zeros(2, 197, 8), 224, 224) is vit224.pos_embed
    with pytest.raises(ValueError, match="tokens"):
        vit224.interpolate_pos_encoding(torch.zeros(2, 10, 8), 224, 224)


def test_forward_tokens_uses_dino_table_at_other_sizes(vit224: MugsViT) -> None:
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        patches = F.conv2d(x, vit224.patch_embed.proj.weight, vit224.patch_embed.proj.bias, stride=16)
        tokens = torch.cat([vit224.cls_token.expand(2, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        expected = vit224.blocks(tokens + _dino_table(vit224.pos_embed, 6, 5))
        got = vit224.forward_tokens(x)
        features = vit224.forward_features(x)
    assert got.shape == (2, 1 + 30, 8)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(features, vit224.norm(expected))


def test_prenorm_tokens_match_timm_forward_features_at_native_size() -> None:
    torch.manual_seed(0)
    ours = MugsViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    plain = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    plain.load_state_dict(_no_relation(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ours.forward_tokens(x)
        reference = plain.eval().forward_features(x)
    assert tokens.shape == (2, 65, 32)
    torch.testing.assert_close(ours.norm(tokens), reference)
    assert not torch.allclose(tokens, reference, atol=1e-2)  # the tokens really are pre-norm
    torch.testing.assert_close(ours(x), reference[:, 0])


def test_backbone_loads_strictly_into_timm_vit_small() -> None:
    backbone = create_backbone("vit_small")
    state = backbone.state_dict()
    relation = {k for k in state if k.startswith("relation_blocks.")}
    assert relation == {"relation_blocks.0." + k for k in backbone.blocks[0].state_dict()}
    for k in relation:
        assert state[k].shape == state[k.replace("relation_blocks.0.", "blocks.0.")].shape
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    reference.load_state_dict(_no_relation(state), strict=True)


def test_backbone_configuration() -> None:
    backbone = create_backbone("vit_tiny", patch_size=4, img_size=32, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in backbone.blocks]
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])
    assert isinstance(backbone.relation_blocks[0].drop_path1, nn.Identity)
    assert backbone.norm.eps == backbone.relation_blocks[0].norm1.eps == 1e-6
    assert backbone.blocks[0].attn.qkv.bias is not None
    assert 0.01 < backbone.cls_token.std().item() < 0.03  # official trunc-normal(0.02), not timm's 1e-6
    assert backbone.blocks[0].mlp.fc1.out_features == 4 * 192
    assert create_backbone("vit_tiny", relation_block=False).relation_blocks is None
    with pytest.raises(ValueError, match=r"'vit_huge'.*vit_small"):
        create_backbone("vit_huge")


def test_relate_output_and_gradient_paths() -> None:
    torch.manual_seed(0)
    backbone = MugsViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    memory = NeighbourMemory(16, 32, top_n=3)
    query = torch.randn(2, 32, requires_grad=True)
    neighbours = memory.retrieve(query)
    assert neighbours.shape == (2, 3, 32) and not neighbours.requires_grad

    out = backbone.relate(query, neighbours)
    block = backbone.relation_blocks[0]
    expected = backbone.norm(block(torch.cat([query[:, None], neighbours], dim=1))[:, 0])
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, expected)
    # The neighbours matter: other rows give another feature.
    assert not torch.allclose(out, backbone.relate(query, neighbours.flip(0)))

    out.square().sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert all(b.grad is None and not b.requires_grad for b in memory.buffers())
    assert backbone.blocks[0].attn.qkv.weight.grad is None


# ------------------------------------------------------------------------------------------------ memory


def test_memory_buffers() -> None:
    memory = NeighbourMemory(64, 8)
    assert memory.search_keys.shape == memory.values.shape == (64, 8)
    assert not torch.equal(memory.search_keys, memory.values)  # independent draws
    assert memory.pointer.dtype == torch.int64 and memory.pointer.tolist() == [0]
    assert set(memory.state_dict()) == {"search_keys", "values", "pointer"}
    with pytest.raises(ValueError, match="pointer_mode"):
        NeighbourMemory(8, 2, pointer_mode="wrap")
    with pytest.raises(ValueError, match="top_n"):
        NeighbourMemory(4, 2, top_n=5)


def test_memory_retrieves_top_n_by_cosine_and_returns_raw_values() -> None:
    memory = NeighbourMemory(5, 2, top_n=3)
    memory.search_keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [10.0, 1.0], [1.0, 1.0]]))
    memory.values.copy_(torch.arange(10.0).reshape(5, 2) + 100)
    # Query 0: cosines 1, 0, -1, 0.995, 0.707 (a raw dot product would rank key 3 first).
    # Query 1: cosines -0.316, 0.949, 0.316, -0.220, 0.447.
    query = torch.tensor([[5.0, 0.0], [-1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    got = memory.retrieve(query)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, memory.values[torch.tensor([[0, 3, 4], [1, 4, 2]])], rtol=0, atol=0)


def _filled(size: int, mode: str) -> NeighbourMemory:
    memory = NeighbourMemory(size, 1, top_n=1, pointer_mode=mode)
    memory.search_keys.fill_(-1)
    memory.values.fill_(-1)
    return memory


def _rows(*values: float) -> torch.Tensor:
    return torch.tensor(values).reshape(-1, 1)


def _state(memory: NeighbourMemory) -> tuple[list[float], int]:
    assert torch.equal(memory.search_keys, memory.values)
    return memory.values.flatten().tolist(), int(memory.pointer)


def test_memory_fixed_pointer_is_a_ring_buffer() -> None:
    memory = _filled(5, "fixed")
    memory.enqueue(_rows(1, 2, 3))
    assert _state(memory) == ([1, 2, 3, -1, -1], 3)
    memory.enqueue(_rows(4, 5, 6))
    assert _state(memory) == ([6, 2, 3, 4, 5], 1)
    memory.enqueue(torch.empty(0, 1))
    assert _state(memory) == ([6, 2, 3, 4, 5], 1)
    # More rows than slots: row i lands on (1 + i) % 5, the later ones win.
    memory.enqueue(_rows(7, 8, 9, 10, 11, 12, 13))
    assert _state(memory) == ([11, 12, 13, 9, 10], 3)


def test_memory_official_pointer_strides_by_2n_and_wraps() -> None:
    memory = _filled(8, "official")
    memory.enqueue(_rows(1, 2))
    assert _state(memory) == ([1, 2, -1, -1, -1, -1, -1, -1], 4)
    memory.enqueue(_rows(3, 4))
    assert _state(memory) == ([1, 2, -1, -1, 3, 4, -1, -1], 0)
    memory.enqueue(_rows(5, 6, 7))
    assert _state(memory) == ([5, 6, 7, -1, 3, 4, -1, -1], 6)
    # Crossing the end wraps the rows and leaves the pointer right after them.
    memory.enqueue(_rows(8, 9, 10))
    assert _state(memory) == ([10, 6, 7, -1, 3, 4, 8, 9], 1)

    exact = _filled(4, "official")
    exact.enqueue(_rows(1))
    exact.enqueue(_rows(2, 3))  # ends exactly at the end: no wrap, pointer (4 + 2) % 4
    assert _state(exact) == ([1, -1, 2, 3], 2)
    with pytest.raises(ValueError, match="cannot write"):
        exact.enqueue(_rows(1, 2, 3, 4, 5))


# ------------------------------------------------------------------------------------------------- heads


def test_projection_head_layout_and_outputs() -> None:
    torch.manual_seed(0)
    teacher = ProjectionPredictionHead(192, hidden_dim=64, out_dim=16, predictor=False)
    student = ProjectionPredictionHead(
        192, hidden_dim=64, out_dim=16, predictor=True, predictor_hidden_dim=32
    )
    assert teacher.predictor is None
    assert [k for k in teacher.state_dict()] == [f"projector.{i}.weight" for i in (0, 2, 4)]
    assert [k for k in student.state_dict()][3:] == ["predictor.0.weight", "predictor.2.weight"]
    assert [tuple(student.state_dict()[f"predictor.{i}.weight"].shape) for i in (0, 2)] == [
        (32, 16),
        (16, 32),
    ]
    assert all(m.bias is None for m in student.modules() if isinstance(m, nn.Linear))
    # trunc-normal(0.02) projector, PyTorch default (uniform ±1/sqrt(fan_in)) predictor.
    assert teacher.projector[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    first = student.predictor[0].weight
    assert first.abs().max() <= 0.25 and first.abs().max() > 0.2

    x = torch.randn(5, 192)
    z = teacher(x)
    p = student(x)
    assert z.shape == p.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(
        z, F.normalize(teacher.projector[4](F.gelu(teacher.projector[2](F.gelu(teacher.projector[0](x))))))
    )
    inner = F.normalize(student.projector(x), dim=-1)
    torch.testing.assert_close(p, F.normalize(student.predictor[2](F.gelu(student.predictor[0](inner)))))
    student.norm_before_pred = False
    unnormed = F.normalize(student.predictor(student.projector(x)), dim=-1)
    torch.testing.assert_close(student(x), unnormed)


def test_projection_head_with_batch_norm_shifts_indices() -> None:
    head = ProjectionPredictionHead(8, hidden_dim=16, out_dim=4, use_bn=True, predictor=False)
    kinds = [type(m) for m in head.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]


def test_group_head_weight_norm_and_frozen_gain() -> None:
    torch.manual_seed(0)
    head = GroupHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert gain.shape == (64, 1) and direction.shape == (64, 16)
    assert torch.equal(gain, torch.ones(64, 1)) and not gain.requires_grad
    assert all(
        torch.equal(head.projector[i].bias, torch.zeros_like(head.projector[i].bias)) for i in (0, 2, 4)
    )
    assert [head.projector[i].out_features for i in (0, 2, 4)] == [32, 32, 16]

    x = torch.randn(3, 192)
    logits = head(x)
    expected = F.normalize(head.projector(x), dim=-1) @ F.normalize(direction, dim=-1).T
    assert logits.shape == (3, 64)
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 1 + 1e-6  # unit gain: cosine similarities

    free = GroupHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


# ----------------------------------------------------------------------------------------------- network


@pytest.fixture
def student(monkeypatch: pytest.MonkeyPatch) -> MugsNetwork:
    return _net(monkeypatch, student=True)


def test_network_forward_shapes_and_values(student: MugsNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    crops = _crops()
    calls: list[tuple[int, ...]] = []
    backbone = student.backbone
    forward_tokens = backbone.forward_tokens
    monkeypatch.setattr(
        backbone, "forward_tokens", lambda x: calls.append(tuple(x.shape)) or forward_tokens(x)
    )
    with torch.no_grad():
        out = student(crops)
    monkeypatch.undo()
    assert calls == [(4, 3, 32, 32), (4, 3, 16, 16)]  # one call per resolution group
    assert out.instance.shape == out.local_group.shape == (8, 16)
    assert out.group.shape == (8, 64)
    assert out.cls.shape == (8, 32) and out.memory_feature.shape == (2, 32)

    with torch.no_grad():
        per_crop = [backbone.forward_tokens(c) for c in crops]
        cls = torch.cat([backbone.norm(t)[:, 0] for t in per_crop])
        relation = torch.cat(
            [backbone.relate(t.mean(1), student.memory.retrieve(t.mean(1))) for t in per_crop]
        )
        torch.testing.assert_close(out.cls, cls)
        torch.testing.assert_close(out.memory_feature, backbone.forward_features(crops[0])[:, 1:].mean(1))
        torch.testing.assert_close(out.instance, student.instance_head(cls))
        torch.testing.assert_close(out.local_group, student.local_group_head(relation))
        torch.testing.assert_close(out.group, student.group_head(cls))
    torch.testing.assert_close(out.instance.norm(dim=-1), torch.ones(8))


def test_network_memory_feature_is_detached_and_gradients_flow(student: MugsNetwork) -> None:
    out = student(_crops())
    assert not out.memory_feature.requires_grad
    out.local_group.sum().backward()
    relation = student.backbone.relation_blocks[0].attn.qkv.weight
    assert relation.grad is not None and relation.grad.abs().sum() > 0
    assert student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # through the query
    student.zero_grad(set_to_none=True)


def test_disabled_heads_are_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net(monkeypatch, instance=False, local_group=False)
    assert net.instance_head is None and net.local_group_head is None and net.memory is None
    assert net.backbone.relation_blocks is None
    prefixes = {k.split(".")[0] for k in net.state_dict()}
    assert prefixes == {"backbone", "group_head"}
    assert not any(k.startswith("backbone.relation_blocks") for k in net.state_dict())
    out = net(_crops())
    assert out.instance is None and out.local_group is None and out.group.shape == (8, 64)
    with pytest.raises(ValueError, match="local-group head"):
        MugsNetwork(net.backbone, None, ProjectionPredictionHead(32, predictor=False), None, None)


def test_teacher_names_are_a_subset_of_student_names(monkeypatch: pytest.MonkeyPatch) -> None:
    student = _net(monkeypatch, student=True, drop_path_rate=0.2, use_bn_in_head=True)
    teacher = _net(monkeypatch, student=False, drop_path_rate=0.2, use_bn_in_head=True)
    s_params = {k: p.shape for k, p in student.named_parameters()}
    t_params = {k: p.shape for k, p in teacher.named_parameters()}
    assert t_params.items() <= s_params.items()
    extra = set(s_params) - set(t_params)
    assert extra and all(".predictor." in k for k in extra)
    assert set(teacher.state_dict()) <= set(student.state_dict())
    assert teacher.instance_head.predictor is None and teacher.local_group_head.predictor is None
    assert not any(hasattr(b.drop_path1, "drop_prob") for b in teacher.backbone.blocks)
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert math.isclose(teacher.memory.size, 32) and teacher.memory.top_n == 4
