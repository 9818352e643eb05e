"""Perceiver resampler (Flamingo, Alayrac et al. 2022) in HistoGPT's parameter layout.

Notation: B batch, M media per sample (HistoGPT uses 1: the whole slide), N media
tokens (tiles), L latents, h heads, d head dim.

A fixed set of L learned latents cross-attends to the tiles of a slide, ``depth``
times, each time followed by a feed-forward block; keys and values come from the
tiles *and* the latents concatenated (Flamingo's choice). Names follow
``flamingo_pytorch`` 0.1.2 (``norm_media``, ``norm_latents``, ``to_q``, ``to_kv``,
``to_out``; FeedForward ``.0 .1 .3``) and HistoGPT's resampler (``linear``,
``media_pos``, ``latents``, ``layers.{i}.0/1``, ``norm``), so the
``histogpt.perceiver_resampler.*`` part of a HistoGPT checkpoint loads as it is.

Differences from the reference, none of which changes the outputs of an unpadded
input: a ``mask`` removes padded tiles from the keys (the reference has no mask);
the input is not forced to float32 (the reference calls ``x.float()``), so the
module runs in whatever dtype it is cast to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeedForward", "PerceiverAttention", "PerceiverResampler"]


class FeedForward(nn.Sequential):
    """``LayerNorm → Linear(dim, mult·dim) → GELU → Linear(mult·dim, dim)``, no biases."""

    def __init__(self, *, dim: int, mult: int = 4):
        inner_dim = int(dim * mult)
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(),
                         nn.Linear(inner_dim, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to ``concat(media, latents)``.

    Parameters
    ----------
    dim : int
        Width of media tokens and latents.
    dim_head, heads : int
        d and h; projections are dim → h·d without bias, scale d^-0.5.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)  # (..., n, h·d) -> (..., h, n, d)

    def forward(self, media: Tensor, latents: Tensor, media_mask: Tensor | None = None,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``media (..., N, dim)``, ``latents (..., L, dim)``, ``media_mask (..., N)`` bool
        (True = real) → ``(..., L, dim)``; with ``return_attention`` also the weights
        ``(..., h, L, N + L)`` (media keys first)."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self._split_heads(self.to_q(latents))  # (..., h, L, d)
        k, v = (self._split_heads(t) for t in self.to_kv(torch.cat([media, latents], dim=-2)).chunk(2, dim=-1))

        key_mask = None  # (..., 1, 1, N + L); latents are always valid keys, so no row is empty
        if media_mask is not None:
            always = torch.ones(*media_mask.shape[:-1], latents.shape[-2], dtype=torch.bool, device=media_mask.device)
            key_mask = torch.cat([media_mask, always], dim=-1)[..., None, None, :]

        if return_attention:
            sim = (q * self.scale) @ k.transpose(-1, -2)  # (..., h, L, N + L)
            if key_mask is not None:
                sim = sim.masked_fill(~key_mask, float("-inf"))
            attn = torch.softmax(sim.float(), dim=-1).to(v.dtype)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=self.scale)
        out = self.to_out(out.transpose(-2, -3).flatten(-2))  # (..., L, dim)
        return (out, attn) if return_attention else out


class PerceiverResampler(nn.Module):
    """Tiles ``(B, N, in_dim)`` → latents ``(B, L, dim)``; HistoGPT's defaults.

    Parameters
    ----------
    in_dim : int
        Tile feature dim (768 for HistoGPT's CTransPath features).
    dim : int
        Width of the latents; tiles are projected to it by ``linear`` (no bias).
    depth : int
        Number of (attention, feed-forward) layers.
    num_latents : int
        L.
    dim_head, heads : int
        Attention head dim and count.
    ff_mult : int
        Feed-forward expansion.
    num_media : int
        Length of the learned media position table ``media_pos (num_media, 1, dim)``.
    """

    def __init__(self, *, in_dim: int = 768, dim: int = 1536, depth: int = 6, num_latents: int = 640,
                 dim_head: int = 96, heads: int = 16, ff_mult: int = 4, num_media: int = 1):
        super().__init__()
        self.linear = nn.Linear(in_dim, dim, bias=False)
        self.media_pos = nn.Parameter(torch.randn(num_media, 1, dim))
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim=dim, mult=ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, N, in_dim)`` or ``(B, M, N, in_dim)``, ``mask`` of the same leading
        shape → latents ``(B, [M,] L, dim)``; with ``return_attention`` also the last
        layer's weights ``(B, [M,] h, L, N + L)``."""
        single = x.ndim == 3
        x = self.linear(x)
        if single:
            x = x.unsqueeze(1)  # (B, 1, N, dim)
            mask = None if mask is None else mask.unsqueeze(1)
        batch, media = x.shape[:2]
        x = x + self.media_pos[:media]
        latents = self.latents.expand(batch, media, -1, -1)  # (B, M, L, dim)
        attn = None
        for i, (attention, feed_forward) in enumerate(self.layers):
            if return_attention and i == len(self.layers) - 1:
                update, attn = attention(x, latents, mask, return_attention=True)
            else:
                update = attention(x, latents, mask)
            latents = latents + update
            latents = latents + feed_forward(latents)
        latents = self.norm(latents)
        if single:
            latents = latents.squeeze(1)
            attn = None if attn is None else attn.squeeze(1)
        return (latents, attn) if return_attention else latents
