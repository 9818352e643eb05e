"""Flamingo's gated cross-attention, fused into a Hugging Face decoder by composition.

Notation: B batch, T text tokens, L media tokens (resampler latents), E decoder width,
h heads, d head dim.

A :class:`GatedCrossAttentionBlock` lets text attend to media tokens; its two residual
branches are scaled by ``tanh`` of a learned gate that starts at 0, so a freshly
initialised block leaves the language model's output unchanged (Alayrac et al. 2022).
:class:`FusionLayer` puts one block in front of an existing decoder layer and passes
every other argument through untouched, so the decoder's own forward, masks and KV
cache keep working whatever the library's layer-call convention is.

Names follow ``flamingo_pytorch`` 0.1.2 as HistoGPT uses them (``attn.norm``,
``attn.to_q``, ``attn.to_kv``, ``attn.to_out``, ``attn_gate``, ``ff.0/1/3``,
``ff_gate``); a :class:`FusionLayer` is ``[block, decoder layer]``, so its keys are
``{i}.0.*`` and ``{i}.1.*`` as in HistoGPT's checkpoints.

Differences from the reference, none of which changes the outputs: the media keys and
values can be computed once (:meth:`GatedCrossAttentionBlock.media_kv`) and reused
for every decoding step; attention runs through ``scaled_dot_product_attention``;
``media_locations`` (interleaved images) is not supported — HistoGPT never passes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histoscope.layers.perceiver import FeedForward

__all__ = ["CrossAttention", "FusionLayer", "GatedCrossAttentionBlock", "MediaKV"]

MediaKV = tuple[Tensor, Tensor]  # keys and values, each (B, h, L, d)


class CrossAttention(nn.Module):
    """Text queries (layer-normed) attend to media keys/values (not normed); no biases.

    Parameters
    ----------
    dim : int
        E, the width of text and media tokens.
    dim_head, heads : int
        d and h; projections are E → h·d, scale d^-0.5.
    """

    def __init__(self, *, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, n, h·d) -> (B, h, n, d)

    def media_kv(self, media: Tensor) -> MediaKV:
        """``media (B, L, E)`` → keys and values ``(B, h, L, d)``."""
        k, v = self.to_kv(media).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(self, x: Tensor, media_kv: MediaKV) -> Tensor:
        """``x (B, T, E)`` → ``(B, T, E)``; every text token sees every media token."""
        q = self._split_heads(self.to_q(self.norm(x)))  # (B, h, T, d)
        k, v = media_kv
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=self.scale)  # (B, h, T, d)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class GatedCrossAttentionBlock(nn.Module):
    """``x + tanh(attn_gate)·CrossAttention(x)``, then ``x + tanh(ff_gate)·FeedForward(x)``.

    Parameters
    ----------
    dim : int
        E.
    dim_head, heads : int
        Cross-attention head dim and count (HistoGPT: the decoder's, E / heads).
    ff_mult : int
        Feed-forward expansion.
    """

    def __init__(self, *, dim: int, dim_head: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.attn = CrossAttention(dim=dim, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim=dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def media_kv(self, media: Tensor) -> MediaKV:
        """``media (B, L, E)`` → this block's keys and values ``(B, h, L, d)``."""
        return self.attn.media_kv(media)

    def forward(self, x: Tensor, media_kv: MediaKV) -> Tensor:
        x = x + self.attn(x, media_kv) * self.attn_gate.tanh()
        return x + self.ff(x) * self.ff_gate.tanh()


class FusionLayer(nn.ModuleList):
    """``[GatedCrossAttentionBlock, decoder layer]`` run in that order.

    The media keys/values are set by the owning model for the duration of a forward
    (``media_kv``); while it is ``None`` the block is skipped and the layer is the plain
    decoder layer (HistoGPT without an image). All arguments after the hidden states
    go to the decoder layer unchanged, and its return value is returned as it is.
    """

    def __init__(self, *, block: GatedCrossAttentionBlock, layer: nn.Module):
        super().__init__([block, layer])
        self.media_kv: MediaKV | None = None

    @property
    def block(self) -> GatedCrossAttentionBlock:
        return self[0]

    @property
    def layer(self) -> nn.Module:
        return self[1]

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if self.media_kv is not None:
            hidden_states = self[0](hidden_states, self.media_kv)
        return self[1](hidden_states, *args, **kwargs)
