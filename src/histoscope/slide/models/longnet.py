"""Prov-GigaPath slide encoder: LongNet over tile embeddings (``gigapath_slide_enc12l768d``).

Xu et al., "A whole-slide foundation model for digital pathology from real-world
data", Nature 2024. Notation: B slides, N tiles, D tile dim (1536), E width (768),
L = N + 1 tokens (cls first).

``tiles (B, N, D) → patch_embed.proj → + 2-D sin-cos(grid of coords) → [cls; tiles]
→ dropout → 12 × pre-LN LongNet layer → encoder.layer_norm → pool → norm``.

Positions. ``coords`` are level-0 pixel (x, y) of the tiles' top-left corners; the
grid index is ``g = floor(coords / tile_size)`` and the embedding of (gx, gy) is
``[sin(gy·ω), cos(gy·ω), sin(gx·ω), cos(gx·ω)]``, ``ω_t = 10000^(-t/(E/4))``: the
official 1,000,001 × 768 table row ``gx·1000 + gy + 1``, computed on the fly for the
cells present instead of stored (a y index ≥ ``slide_ngrids`` wraps onto the next x
row as the table lookup does). ``tile_size`` must be the tile's edge in level-0
pixels, ``patch_size_level0`` of the features file, as TRIDENT sets it: 256 for
256-px tiles read at level 0, but 512 for 256-px tiles at 0.5 µm/px cut from a
0.25 µm/px scan (their level-0 coordinates step by 512).

Layers (``torchscale`` EncoderLayer with subln, eps 1e-5; the outer ``norm`` 1e-6)::

    x = x + drop_path(dropout(self_attn(self_attn_layer_norm(x))))
    x = x + drop_path(ffn(final_layer_norm(x)))
    ffn = fc1 → gelu (exact, float32) → ffn_layernorm → fc2 → dropout

``self_attn`` is :class:`~histoscope.layers.dilated_attention.DilatedAttention`
with the published branches (1024, 1), (5792, 2), (32768, 4), (185363, 8),
(1048576, 16) over the token sequence in input order.

Pooling (``global_pool``): True, the released pipeline's setting, takes the mean of
the tile tokens then ``norm``; False takes ``norm`` of the cls token (not trained
during slide-level pretraining, says the official demo). The default embedding is
``pool(encoder.layer_norm(h_12))``; ``feat_layers`` instead concatenates
``pool(h_i)`` of the official ``all_layer_embed`` list ``[h_0 … h_12]`` (h_0 the
embeddings, h_i the raw output of layer i, no ``encoder.layer_norm``), as the
official ``ClassificationHead`` does (its default ``"11"``; TRIDENT uses ``[11]``).

Masks: masked tiles are dropped (real tiles keep their order and move to the
front), and the dilated attention counts the official zero padding for each
slide's own length, so a slide in a padded batch gives exactly what it gives alone
and what the official model gives. Scores: the official model has no per-tile
attention to the slide token (dilated attention never forms one); ``scores`` is the
cosine similarity between each tile's final token (after ``norm``) and the pooled
slide vector, a proxy for how much the tile looks like the slide summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from histoscope.layers.dilated_attention import DilatedAttention
from histoscope.layers.sincos import sincos_2d
from histoscope.slide.base import SlideModel, SlideOutput, default_mask
from histoscope.slide.models import PUBLISHED_DILATION_RATIOS, PUBLISHED_SEGMENT_LENGTHS

__all__ = ["LongNetSlideEncoder", "LongNetEncoder", "LongNetEncoderLayer", "gigapath_state_dict",
           "optimal_segment_lengths", "grid_indices", "PUBLISHED_SEGMENT_LENGTHS", "PUBLISHED_DILATION_RATIOS"]

_FFN_CHUNK = 1 << 14  # tokens per feed-forward call without autograd (bounds the 4·E-wide activations)


def optimal_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> list[int]:
    """Prov-GigaPath's ``get_optimal_segment_length``: 5 lengths from 1024 to the
    number of tiles of the largest slide, geometrically, truncated (→ the published set)."""
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)
    return np.power(2, exponents).astype(int).tolist()


def grid_indices(coords: Tensor, tile_size: float, slide_ngrids: int = 1000) -> tuple[Tensor, Tensor]:
    """Level-0 (x, y) (..., 2) → grid indices (gx, gy) (...) int64 of the official table,
    including its wrap of gy ≥ slide_ngrids onto the next gx."""
    cell = torch.floor(coords.to(torch.float64) / tile_size).long()  # (..., 2)
    flat = cell[..., 0] * slide_ngrids + cell[..., 1]  # the official table row - 1
    return torch.div(flat, slide_ngrids, rounding_mode="floor"), torch.remainder(flat, slide_ngrids)


class PatchEmbed(nn.Module):
    def __init__(self, *, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class FeedForward(nn.Module):
    """``fc1 → gelu → ffn_layernorm → fc2 → dropout`` (torchscale, subln; the GELU in
    at least float32, as torchscale computes it)."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float, layernorm_eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.ffn_layernorm = nn.LayerNorm(hidden_dim, eps=layernorm_eps)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = F.gelu(x.to(torch.promote_types(x.dtype, torch.float32))).type_as(x)
        return self.dropout(self.fc2(self.ffn_layernorm(x)))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.shape[1] <= _FFN_CHUNK:
            return self._forward(x)
        # Position-wise, so chunking is exact; keeps the (B, L, 4E) activations small.
        return torch.cat([self._forward(part) for part in x.split(_FFN_CHUNK, dim=1)], dim=1)


class LongNetEncoderLayer(nn.Module):
    """Pre-LN LongNet layer; parameter names as torchscale's ``EncoderLayer``."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilation_ratios: Sequence[int], dropout: float, drop_path: float, layernorm_eps: float = 1e-5,
                 count_pad_keys: bool = True):
        super().__init__()
        self.self_attn = DilatedAttention(dim=dim, num_heads=num_heads, segment_lengths=segment_lengths,
                                          dilation_ratios=dilation_ratios, subln=True, layernorm_eps=layernorm_eps,
                                          count_pad_keys=count_pad_keys)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=layernorm_eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout, layernorm_eps=layernorm_eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=layernorm_eps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.dropout(self.self_attn(x, mask, pre_norm=self.self_attn_layer_norm)))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """Embedding dropout, ``layers``, final ``layer_norm`` (torchscale ``Encoder``).

    Stochastic depth grows linearly, ``linspace(0, drop_path_rate, depth)[i]`` for layer i.
    """

    def __init__(self, *, dim: int, depth: int, num_heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilation_ratios: Sequence[int], dropout: float, drop_path_rate: float, layernorm_eps: float = 1e-5,
                 count_pad_keys: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        rates = np.linspace(0, drop_path_rate, depth)
        self.layers = nn.ModuleList(
            LongNetEncoderLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, segment_lengths=segment_lengths,
                                dilation_ratios=dilation_ratios, dropout=dropout, drop_path=float(rates[i]),
                                layernorm_eps=layernorm_eps, count_pad_keys=count_pad_keys)
            for i in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=layernorm_eps)

    def forward(self, x: Tensor, mask: Tensor | None = None, pool=None) -> tuple[Tensor, list[Tensor]]:
        """x (B, L, E) → (layer_norm(h_depth) (B, L, E), [pool(h_0), …, pool(h_depth)] if ``pool``)."""
        x = self.dropout(x)
        pooled = [pool(x)] if pool is not None else []
        for layer in self.layers:
            x = layer(x, mask)
            if pool is not None:
                pooled.append(pool(x))
        return self.layer_norm(x), pooled


class LongNetSlideEncoder(SlideModel):
    """Prov-GigaPath ``LongNetViT`` (see the module notes).

    Parameters
    ----------
    in_dim : int
        D, the tile encoder's width (1536 for Prov-GigaPath tiles).
    num_outputs : int
        C; > 0 adds a Linear ``head`` on the slide embedding.
    embed_dim, depth, num_heads, mlp_ratio : int, int, int, float
        E, layers, heads (E / heads per head), FFN width E·mlp_ratio.
    segment_lengths, dilation_ratios : sequence of int
        The dilated-attention branches.
    tile_size : float
        Level-0 pixels per grid step: the features' tile geometry ``size_level0``
        (``patch_size_level0``; ``histoscope train`` sets it from the features file).
    slide_ngrids : int
        Width of the official position table (only its wrap-around depends on it).
    global_pool : bool
        Mean of the tile tokens (True) or the cls token (False).
    feat_layers : sequence of int, optional
        Build the embedding from these entries of ``[h_0 … h_depth]`` (E · len each).
    all_layer_embed : bool
        Also return ``extras["layer_embeddings"]`` (B, depth + 1, E).
    dropout, drop_path_rate : float
        Dropout (embeddings, attention output, FFN output) and maximum stochastic depth.
    count_pad_keys : bool
        Keep the official zero-padding keys in the attention softmax (checkpoint parity).
    """

    def __init__(self, *, in_dim: int, num_outputs: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 segment_lengths: Sequence[int], dilation_ratios: Sequence[int], tile_size: float, slide_ngrids: int,
                 global_pool: bool, feat_layers: Sequence[int] | None, all_layer_embed: bool, dropout: float,
                 drop_path_rate: float, count_pad_keys: bool):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos positions, got {embed_dim}")
        if feat_layers is not None and not all(0 <= i <= depth for i in feat_layers):
            raise ValueError(f"feat_layers {list(feat_layers)} must index [h_0 … h_{depth}]")
        self.width = embed_dim
        self.tile_size = tile_size
        self.slide_ngrids = slide_ngrids
        self.global_pool = global_pool
        self.feat_layers = tuple(feat_layers) if feat_layers is not None else None
        self.all_layer_embed = all_layer_embed
        self.count_pad_keys = count_pad_keys
        self.embed_dim = embed_dim * (len(self.feat_layers) if self.feat_layers else 1)
        self.num_outputs = num_outputs

        self.patch_embed = PatchEmbed(in_dim=in_dim, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = LongNetEncoder(dim=embed_dim, depth=depth, num_heads=num_heads,
                                      ffn_dim=int(embed_dim * mlp_ratio), segment_lengths=segment_lengths,
                                      dilation_ratios=dilation_ratios, dropout=dropout, drop_path_rate=drop_path_rate,
                                      count_pad_keys=count_pad_keys)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(self.embed_dim, num_outputs) if num_outputs > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        # The official initialize_vit_weights: xavier everywhere (undoing torchscale's subln scaling).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def layer_ids(self) -> dict[str, int]:
        """Prov-GigaPath fine-tuning's depths (its ``get_layer_id`` on ``ClassificationHead``
        names): ``cls_token`` 0, ``encoder.layers.i`` i + 1, everything else depth + 1.
        Everything else includes ``patch_embed``: the official rule tests for a
        ``patch_embed`` prefix that the head's ``slide_encoder.patch_embed.*`` names never
        have, so the published fine-tuning trains the tile projection at the full rate."""
        top = len(self.encoder.layers) + 1
        ids = {}
        for name, _ in self.named_parameters():
            if name == "cls_token":
                ids[name] = 0
            elif name.startswith("encoder.layers."):
                ids[name] = int(name.split(".")[2]) + 1
            else:
                ids[name] = top
        return ids

    def position_embedding(self, coords: Tensor, dtype: torch.dtype) -> Tensor:
        """coords (B, N, 2) level-0 (x, y) → (B, N, E) fixed 2-D sin-cos."""
        gx, gy = grid_indices(coords, self.tile_size, self.slide_ngrids)
        return sincos_2d(gy, gx, self.width, dtype=dtype)  # table row gx·ngrids + gy: gy runs fastest

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        """``extras``: ``layer_embeddings`` (B, depth+1, E) when ``all_layer_embed``."""
        if coords is None:
            raise ValueError("LongNetSlideEncoder needs the tiles' level-0 coords")
        masked = mask is not None
        mask = default_mask(features, mask)  # (B, N)
        B, N, _ = features.shape
        if masked:
            # Real tiles first, in their order: masked tiles leave the sequence rather than hiding in it.
            order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, N)
            features = features.gather(1, order.unsqueeze(-1).expand_as(features))
            coords = coords.gather(1, order.unsqueeze(-1).expand(-1, -1, coords.shape[-1]))
            mask = mask.gather(1, order)
            features = features.masked_fill(~mask.unsqueeze(-1), 0)  # padding may hold anything, even NaN
            coords = coords.masked_fill(~mask.unsqueeze(-1), 0)

        x = self.patch_embed(features)  # (B, N, E)
        x.add_(self.position_embedding(coords, x.dtype))  # in place: at 100k tiles every N·E copy counts
        x = torch.cat([self.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, L, E)
        tokens_mask = F.pad(mask, (1, 0), value=True)  # (B, L)
        # An all-real batch runs the official path; with count_pad_keys the masked path equals it anyway.
        attn_mask = tokens_mask if masked and (not self.count_pad_keys or not bool(mask.all())) else None

        weights = (mask / mask.sum(1, keepdim=True).clamp(min=1)).to(x.dtype).unsqueeze(1)  # (B, 1, N)

        def pool(h: Tensor) -> Tensor:  # (B, L, E) → (B, E)
            if self.global_pool:
                return self.norm((weights @ h[:, 1:]).squeeze(1))  # mean of the real tiles
            return self.norm(h[:, 0])

        need_layers = self.all_layer_embed or self.feat_layers is not None
        h, layer_embeddings = self.encoder(x, attn_mask, pool=pool if need_layers else None)  # (B, L, E)
        slide = pool(h)  # (B, E)
        embedding = torch.cat([layer_embeddings[i] for i in self.feat_layers], -1) if self.feat_layers else slide
        logits = self.head(embedding) if self.head is not None else None

        tiles = self.norm(h[:, 1:])  # (B, N, E)
        cosine = (tiles @ slide.unsqueeze(-1)).squeeze(-1) / (tiles.norm(dim=-1) * slide.norm(dim=-1, keepdim=True))
        scores = cosine.nan_to_num() * mask  # (B, N)
        if masked:
            scores = torch.zeros_like(scores).scatter(1, order, scores)
        extras = {"layer_embeddings": torch.stack(layer_embeddings, 1)} if self.all_layer_embed else {}
        return SlideOutput(embedding=embedding, logits=logits, scores=scores, extras=extras)


def gigapath_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """``slide_encoder.pth`` as published (``{"model": state_dict}``) → this model's keys.

    The official keys are used as they are; only a wrapping ``model``/``state_dict``,
    a DataParallel ``module.`` prefix and a stray ``pos_embed`` buffer (never a
    parameter here) are removed.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    state = {}
    for key, value in checkpoint.items():
        key = key.removeprefix("module.")
        if key != "pos_embed":
            state[key] = value
    return state
