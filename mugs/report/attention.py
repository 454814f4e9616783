"""Class-token attention of the last transformer block, as in the paper's attention figures."""

from __future__ import annotations

import torch
from torch import Tensor

from mugs.model.backbone import MugsViT

__all__ = ["last_block_cls_attention"]


@torch.no_grad()
def last_block_cls_attention(backbone: MugsViT, images: Tensor) -> Tensor:
    """Attention of the class token to every patch in the last block: ``[B, heads, gh, gw]``.

    For the last block's normed input ``y = norm1(x)``, ``q, k`` come from its ``qkv`` projection
    (with the block's q/k norms, identities in a plain ViT) and the map is
    ``softmax(q_cls · kᵀ · d^-½)`` restricted to the patch columns. It is computed here rather than
    hooked because timm's fused attention never materialises the matrix. Rows sum to one minus the
    class token's attention to itself.
    """
    backbone.eval()
    x = backbone.patch_embed(images)
    grid = x.shape[1:3]
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x)))
    for block in backbone.blocks[:-1]:
        x = block(x)
    block = backbone.blocks[-1]
    attention = block.attn
    y = block.norm1(x)
    batch, tokens, _ = y.shape
    heads = attention.num_heads
    qkv = attention.qkv(y).reshape(batch, tokens, 3, heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * attention.scale).softmax(dim=-1)
    prefix = tokens - grid[0] * grid[1]
    return weights[:, :, 0, prefix:].reshape(batch, heads, *grid)
