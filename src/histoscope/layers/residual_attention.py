"""The pre-norm transformer block of CLIP's text tower, in open_clip's parameter layout.

CLIP, CoCa and CONCH build their text encoders and multimodal text decoders from this
block; keeping open_clip's names (``ln_1``, ``attn.in_proj_weight``, ``mlp.c_fc``, …)
lets their checkpoints load unchanged. A cross-attention block (``cross_attention=True``)
adds ``ln_1_kv``, the norm CoCa applies to the image tokens it attends to.

Notation: B batch, L query tokens, S context tokens, C width, H heads.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ResidualAttentionBlock", "causal_mask"]


def causal_mask(length: int) -> torch.Tensor:
    """Additive (L, L) mask: 0 on and below the diagonal, -inf above (a token sees its past)."""
    return torch.full((length, length), float("-inf")).triu_(1)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; with ``cross_attention`` the keys
    and values are the normalised ``context`` instead of ``x``."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        if cross_attention:
            self.ln_1_kv = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, dim))]))
        self.cross_attention = cross_attention

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, C) -> (B, L, C).

        ``context`` (B, S, C): what a cross-attention block attends to, with
        ``context_mask`` (B, S) True on real tokens. ``attn_mask``: additive, (L, S) or
        (B·H, L, S) with the heads of a sample adjacent.
        """
        query = self.ln_1(x)
        if self.cross_attention:
            if context is None:
                raise ValueError("a cross-attention block needs a context")
            keys = self.ln_1_kv(context)
        else:
            keys = query
        padding = None
        if context_mask is not None:  # additive, so it combines with a float attn_mask
            padding = torch.zeros(context_mask.shape, dtype=query.dtype, device=query.device)
            padding.masked_fill_(~context_mask, float("-inf"))
        if attn_mask is not None:
            attn_mask = attn_mask.to(query.dtype)
        x = x + self.attn(query, keys, keys, need_weights=False, attn_mask=attn_mask, key_padding_mask=padding)[0]
        return x + self.mlp(self.ln_2(x))
