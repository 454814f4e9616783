"""The Mugs student / teacher network: backbone, neighbour memory and the three heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mugs import distributed
from mugs.config import Config, ModelConfig
from mugs.model.backbone import MugsViT, create_backbone
from mugs.model.heads import GroupHead, ProjectionPredictionHead
from mugs.model.memory import NeighbourMemory

__all__ = ["MugsNetwork", "NetworkOutput", "build_networks", "create_mugs_network", "update_memories"]


@dataclass
class NetworkOutput:
    """Outputs for C crops of B images, rows in crop order (crop c is rows ``c*B … c*B+B-1``).

    ``instance`` / ``local_group``: L2-normalised head outputs ``[C*B, out_dim]`` (None if disabled).
    ``group``: group logits ``[C*B, group_out_dim]`` (None if disabled).
    ``cls``: normed class tokens ``[C*B, D]``.
    ``memory_feature``: mean of the normed patch tokens of crop 0, detached, ``[B, D]``.
    """

    instance: torch.Tensor | None
    local_group: torch.Tensor | None
    group: torch.Tensor | None
    cls: torch.Tensor
    memory_feature: torch.Tensor


class MugsNetwork(nn.Module):
    """Backbone + heads; one backbone call per run of consecutive same-resolution crops.

    For the tokens ``x`` (before the final norm) of every crop:
    ``q = mean(x)`` over all tokens (class token included), ``nb = memory.retrieve(q)``,
    local-group feature ``= backbone.relate(q, nb)``; instance and group heads take ``norm(x)[:, 0]``.
    """

    def __init__(
        self,
        backbone: MugsViT,
        instance_head: ProjectionPredictionHead | None,
        local_group_head: ProjectionPredictionHead | None,
        group_head: GroupHead | None,
        memory: NeighbourMemory | None,
    ) -> None:
        super().__init__()
        if local_group_head is not None and (memory is None or backbone.relation_blocks is None):
            raise ValueError("a local-group head needs a memory and a backbone with a relation block")
        if local_group_head is None and memory is not None:
            raise ValueError("a memory without a local-group head would never be read")
        self.backbone = backbone
        self.instance_head = instance_head
        self.local_group_head = local_group_head
        self.group_head = group_head
        self.memory = memory

    def forward(self, crops: list[torch.Tensor]) -> NetworkOutput:
        batch = crops[0].shape[0]
        cls_parts: list[torch.Tensor] = []
        relation_parts: list[torch.Tensor] = []
        memory_feature: torch.Tensor | None = None
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
                end += 1
            tokens = self.backbone.forward_tokens(torch.cat(crops[start:end]))
            normed = self.backbone.norm(tokens)
            cls_parts.append(normed[:, 0])
            if memory_feature is None:
                memory_feature = normed[:batch, 1:].mean(dim=1).detach()
            if self.memory is not None:
                query = tokens.mean(dim=1)
                relation_parts.append(self.backbone.relate(query, self.memory.retrieve(query)))
            start = end

        cls = torch.cat(cls_parts)
        return NetworkOutput(
            instance=self.instance_head(cls) if self.instance_head is not None else None,
            local_group=self.local_group_head(torch.cat(relation_parts)) if relation_parts else None,
            group=self.group_head(cls) if self.group_head is not None else None,
            cls=cls,
            memory_feature=memory_feature,
        )


def create_mugs_network(
    model: ModelConfig,
    *,
    student: bool,
    img_size: int = 224,
    instance: bool = True,
    local_group: bool = True,
    group: bool = True,
    memory_size: int = 65536,
    top_n: int = 8,
    memory_pointer: str = "fixed",
) -> MugsNetwork:
    """Build a student (``student=True``: heads with predictors) or a teacher network of ``model``.

    A disabled supervision (``instance`` / ``local_group`` / ``group`` False) gets no head; without
    the local-group head there is no memory and no relation block either. The teacher's parameter
    names are a subset of the student's (same shapes), so EMA can match them by name.
    ``model.drop_path_rate`` is the student's stochastic depth; a teacher always gets 0 (METHOD §2).
    The group head's bottleneck and hidden widths are ``model.out_dim`` and ``model.hidden_dim`` (official).
    """
    backbone = create_backbone(
        model.arch,
        patch_size=model.patch_size,
        img_size=img_size,
        drop_path_rate=model.drop_path_rate if student else 0.0,
        relation_block=local_group,
        depth=model.depth,
    )
    dim = backbone.embed_dim

    def projection_head() -> ProjectionPredictionHead:
        return ProjectionPredictionHead(
            dim,
            hidden_dim=model.hidden_dim,
            out_dim=model.out_dim,
            use_bn=model.use_bn_in_head,
            predictor=student,
            predictor_hidden_dim=model.predictor_hidden_dim,
            norm_before_pred=model.norm_before_pred,
        )

    return MugsNetwork(
        backbone,
        instance_head=projection_head() if instance else None,
        local_group_head=projection_head() if local_group else None,
        group_head=(
            GroupHead(
                dim,
                out_dim=model.group_out_dim,
                hidden_dim=model.hidden_dim,
                bottleneck_dim=model.out_dim,
                use_bn=model.use_bn_in_head,
                norm_last_layer=model.norm_last_layer,
            )
            if group
            else None
        ),
        memory=NeighbourMemory(memory_size, dim, top_n, memory_pointer) if local_group else None,
    )


def build_networks(config: Config) -> tuple[MugsNetwork, MugsNetwork]:
    """Student and teacher; the teacher starts from the student's parameters (not its memory)."""
    loss, enabled = config.loss, config.loss.weights()
    common = dict(
        img_size=config.augment.global_size,
        instance="instance" in enabled,
        local_group="local_group" in enabled,
        group="group" in enabled,
        memory_size=loss.local_group_queue_size,
        top_n=loss.local_group_knn_top_n,
        memory_pointer=loss.memory_pointer,
    )
    student = create_mugs_network(config.model, student=True, **common)
    teacher = create_mugs_network(config.model, student=False, **common)
    student_parameters = dict(student.named_parameters())
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            parameter.copy_(student_parameters[name])
            parameter.requires_grad_(False)
    return student, teacher


def initial_networks(config: Config) -> tuple[MugsNetwork, MugsNetwork]:
    """Student and teacher as a pretraining run starts: :func:`build_networks` after seeding torch
    with ``train.seed``, so every rank, and the random-init baseline, gets the same weights."""
    torch.manual_seed(config.train.seed)
    return build_networks(config)


@torch.no_grad()
def update_memories(
    student: MugsNetwork,
    teacher: MugsNetwork,
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    weak: torch.Tensor,
    host_group: dist.ProcessGroup | None,
) -> None:
    """Student memory: weak-flagged first student global crops; teacher memory: all first teacher ones;
    both gathered over ranks.

    ``weak`` is the loader's flags, on the host: the rows to keep are numbered there, so the device
    never has to report how many there are (``rows[mask]`` on a GPU would wait for it).
    """
    if student.memory is None:
        return
    flags = distributed.all_gather_cat(weak, host_group)
    keep = flags.nonzero().squeeze(1).to(student_feature.device, non_blocking=True)
    student_rows = distributed.all_gather_cat(student_feature.float())
    student.memory.enqueue(student_rows.index_select(0, keep))
    teacher.memory.enqueue(distributed.all_gather_cat(teacher_feature.float()))
