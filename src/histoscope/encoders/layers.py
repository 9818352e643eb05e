"""Reusable layers for tile encoders that timm does not provide.

Notation: B batch, L context tokens, Q queries, C context channels, D query channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["AttentionalPooler"]


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
