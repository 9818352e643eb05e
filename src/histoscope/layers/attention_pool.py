"""Attention pooling: K learned queries read a variable number of tokens into K tokens.

Notation: B batch, N input tokens, K queries, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AttentionPool"]


class AttentionPool(nn.Module):
    """``tokens (B, N, D)``, ``mask (B, N)`` bool (True = real) → ``(B, K, D)``.

    One multi-head cross-attention from K learned queries to the layer-normed tokens
    (the compressor of Q-Former-free LLaVA variants); padded tokens are never attended.
    """

    def __init__(self, *, dim: int, num_queries: int, heads: int = 1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens = self.norm(tokens)
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (B, K, D)
        padding = None if mask is None else ~mask.bool()
        out, _ = self.attention(queries, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return out
