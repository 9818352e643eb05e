"""Reusable layers for tile encoders that timm does not provide.

Notation: B batch, L context tokens, Q queries, C context channels, D query channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import to_2tuple
from torch import nn

__all__ = ["AttentionalPooler", "ConvStem"]


class AttentionalPooler(nn.Module):
    """Learned queries cross-attend over a token sequence (CoCa's attentional pooling).

    Parameter names (``query``, ``attn.*``, ``ln_q``, ``ln_k``) follow open_clip/CONCH so
    their checkpoints load unchanged. With ``context_dim != dim`` the attention keeps
    separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``.
    """

    def __init__(self, *, dim: int, context_dim: int, num_heads: int, num_queries: int,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = norm_layer(dim)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, C) -> (B, Q, D)."""
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, D)
        return self.attn(q, x, x, need_weights=False)[0]


class ConvStem(nn.Module):
    """CTransPath's patch stem: two stride-2 3x3 conv-BN-ReLU layers and a 1x1 projection,
    (B, 3, H, W) -> (B, H/4, W/4, C) (NHWC, as current timm's Swin expects)."""

    def __init__(self, *, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", device=None, dtype=None):
        super().__init__()
        if to_2tuple(patch_size) != (4, 4) or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8, "
                             f"got {patch_size} and {embed_dim}")
        if output_fmt != "NHWC":
            raise ValueError(f"ConvStem returns NHWC tokens, not {output_fmt}")
        dd = dict(device=device, dtype=dtype)
        self.img_size = to_2tuple(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(2 * width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, embed_dim, kernel_size=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)
