"""ViT backbone for Mugs: a timm ``VisionTransformer`` plus the local-group relation block.

The parameter layout is timm's (which is also the layout of the official Mugs backbone), with one
extra ``relation_blocks.0`` transformer block. Two behaviours differ from stock timm:

- position embeddings for other input sizes are resampled DINO-style (bicubic with a *scale
  factor* of ``(g + 0.1) / g0`` per axis), which is what the released checkpoints were trained
  with; timm's size-based resampling gives different tokens;
- :meth:`MugsViT.forward_tokens` exposes the tokens *before* the final norm, which the memory
  query of the local-group branch needs.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

__all__ = ["VIT_SIZES", "MugsViT", "create_backbone"]

# arch -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class MugsViT(VisionTransformer):
    """timm ViT (class token, qkv bias, LayerNorm eps 1e-6, MLP ratio 4) with a relation block.

    Any input size whose sides are at least one patch works: the patch embedding is not tied to
    ``img_size`` and the position table is resampled by :meth:`interpolate_pos_encoding`.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        drop_path_rate: float = 0.0,
        relation_block: bool = True,
    ) -> None:
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            class_token=True,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            # Only to make the patch embedding size-agnostic and emit an (H, W) grid; the position
            # table itself is resampled by our own _pos_embed, not timm's.
            dynamic_img_size=True,
        )
        # The official backbone initialises the class token like every other weight (timm: 1e-6).
        trunc_normal_(self.cls_token, std=0.02)
        self.relation_blocks: nn.ModuleList | None = None
        if relation_block:
            block = Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                drop_path=0.0,
                norm_layer=norm_layer,
            )
            block.apply(init_weights_vit_timm)
            self.relation_blocks = nn.ModuleList([block])

    def interpolate_pos_encoding(self, x_tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position table ``[1, 1 + gh*gw, D]`` for an ``h`` × ``w`` pixel input (DINO-style).

        ``x_tokens`` are the tokens it will be added to (class token first). With stored grid
        ``g0`` and new grid ``g = size // patch`` per axis, the patch table is resampled bicubically
        with scale factor ``(g + 0.1) / g0`` (the 0.1 guards ``floor(g0 * scale) == g`` against
        rounding); passing the scale rather than the output size changes where the samples fall,
        and that is what the released checkpoints were trained with.
        """
        ph, pw = self.patch_embed.patch_size
        gh, gw = h // ph, w // pw
        gh0, gw0 = self.patch_embed.grid_size
        if x_tokens.shape[1] != 1 + gh * gw:
            raise ValueError(f"{x_tokens.shape[1]} tokens do not fit a {gh}x{gw} grid plus the class token")
        if (gh, gw) == (gh0, gw0):
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, gh0, gw0, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            scale_factor=((gh + 0.1) / gh0, (gw + 0.1) / gw0),
            mode="bicubic",
            align_corners=False,
        )
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position grid resampled to {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # Overrides timm's so that forward_features / forward_intermediates use the DINO resampling.
        b, gh, gw, dim = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, dim)], dim=1)
        ph, pw = self.patch_embed.patch_size
        x = x + self.interpolate_pos_encoding(x, gh * ph, gw * pw)
        return self.pos_drop(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` → tokens ``[B, 1 + N, D]`` after the last block, before the final norm."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return self.blocks(x)

    def relate(self, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Local-group feature: ``norm(relation_block([q; nb₁ … nbₙ])[:, 0])``.

        ``query`` ``[B, D]``, ``neighbours`` ``[B, n, D]`` → ``[B, D]``. No position embedding is
        added; the final norm is the backbone's own (shared) ``norm``.
        """
        if self.relation_blocks is None:
            raise RuntimeError("this backbone was built with relation_block=False")
        x = torch.cat([query.unsqueeze(1), neighbours], dim=1)
        for block in self.relation_blocks:
            x = block(x)
        return self.norm(x[:, 0])


def create_backbone(
    arch: str,
    *,
    patch_size: int = 16,
    img_size: int = 224,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    relation_block: bool = True,
    depth: int | None = None,
) -> MugsViT:
    """Build a Mugs ViT by name (``VIT_SIZES``); stochastic depth rises linearly 0 → ``drop_path_rate``.

    ``depth`` overrides the number of blocks of the named size (shallow models for CPU demos).
    """
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(VIT_SIZES)}")
    embed_dim, default_depth, num_heads = VIT_SIZES[arch]
    depth = default_depth if depth is None else depth
    return MugsViT(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
        relation_block=relation_block,
    )
