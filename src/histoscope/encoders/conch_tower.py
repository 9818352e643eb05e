"""CONCH's vision tower (Mahmood lab), without the CoCa text side.

The embedding is CONCH's ``encode_image(x, proj_contrast=False, normalize=False)``:
the contrastive attentional pooler's single query over all trunk tokens, layer-
normalised -- the 512-d vector before the contrastive projection. ``proj_contrast``
is loaded too, for zero-shot use (:meth:`ConchVisionTower.project`).

Notation: B batch, T tokens (class + patches), C trunk width, D pooled dim.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from histoscope.encoders.layers import AttentionalPooler

__all__ = ["ConchVisionTower"]


class ConchVisionTower(nn.Module):
    """timm ViT-B/16 trunk + contrastive attentional pooler + LayerNorm: (B, 3, H, W) -> (B, D)."""

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, img_size: int,
                 patch_size: int, pool_dim: int, pool_heads: int):
        super().__init__()
        self.trunk = VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                       img_size=img_size, patch_size=patch_size, num_classes=0,
                                       dynamic_img_size=True)
        self.attn_pool_contrast = AttentionalPooler(dim=pool_dim, context_dim=embed_dim, num_heads=pool_heads,
                                                    num_queries=1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.proj_contrast = nn.Parameter(embed_dim**-0.5 * torch.randn(pool_dim, pool_dim))
        self.num_features = pool_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, T, C), after the trunk's final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # (B, D)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, D) -> the contrastive image-text space (B, D), unnormalised."""
        return pooled @ self.proj_contrast
