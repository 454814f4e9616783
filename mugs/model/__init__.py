"""Mugs network: ViT backbone with relation block, neighbour memory, heads."""

from mugs.model.backbone import VIT_SIZES, MugsViT, create_backbone
from mugs.model.heads import GroupHead, ProjectionPredictionHead
from mugs.model.memory import POINTER_MODES, NeighbourMemory
from mugs.model.network import (
    MugsNetwork,
    NetworkOutput,
    build_networks,
    create_mugs_network,
    initial_networks,
    update_memories,
)

__all__ = [
    "POINTER_MODES",
    "VIT_SIZES",
    "GroupHead",
    "MugsNetwork",
    "MugsViT",
    "NeighbourMemory",
    "NetworkOutput",
    "ProjectionPredictionHead",
    "build_networks",
    "create_backbone",
    "create_mugs_network",
    "initial_networks",
    "update_memories",
]
