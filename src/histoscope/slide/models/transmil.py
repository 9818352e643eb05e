"""TransMIL (Shao et al. 2021) in the official parameter layout.

Notation: B slides, N tiles (padded), n real tiles of one slide, D tile dim, W width
(512), S = ceil(√n) side of the token square, C outputs.

``_fc1 = [Linear(D, W), ReLU]`` → square padding to S² tokens by repeating the first
S² − n tokens (not zeros) → prepend ``cls_token`` → ``layer1`` → ``pos_layer`` (PPEG:
depthwise 7/5/3 convs over the S × S raster of tokens, plus identity) → ``layer2`` →
``norm`` → cls token → ``_fc2``. Each layer is ``x + NystromAttention(LayerNorm(x))``
with no feed-forward block (as published). Token t sits at row t // S, column t % S:
the model uses tile order, not ``coords``, as in the reference.

Padding: TransMIL has no mask. Square padding, PPEG's convolutions and the Nyström
landmarks (means of consecutive tokens) and pseudo-inverse scale all mix every token
of the sequence, so zero-padding a batch changes every output. To honour "padding
changes nothing", each slide's real tiles are run on their own (the reference trains
with one slide per batch, so this is also what it computes); the batch loop costs
little next to the attention itself.

``legacy_nystrom_padding=True`` reproduces nystrom-attention 0.0.9 (pinned by
TransMIL, so behind the published numbers): its output rows are shifted by the front
padding, so the cls slot reads a padding row's output (see
:mod:`histoscope.layers.nystrom`). The default uses the corrected 0.0.10 behaviour.

Scores: the cls row of layer2's Nyström attention matrix (mean over heads); the
attention paid to a repeated copy of a tile is added to the tile itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from histoscope.layers.nystrom import NystromAttention
from histoscope.slide.base import SlideModel, SlideOutput, default_mask

__all__ = ["TransMIL", "PPEG", "TransLayer", "square_pad"]


def square_pad(h: Tensor) -> tuple[Tensor, int]:
    """``(B, n, W)`` → ``(B, S², W)`` by appending copies of the first S² − n tokens, and S."""
    n = h.shape[1]
    side = math.isqrt(n - 1) + 1 if n else 0  # ceil(√n)
    extra = torch.arange(side * side - n, device=h.device) % max(n, 1)
    return torch.cat([h, h[:, extra]], dim=1), side


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``f + dw7(f) + dw5(f) + dw3(f)`` on the token square."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``x (B, 1 + H·W, W)`` with the cls token first → same shape."""
        if height * width == 0:
            return x
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).unflatten(2, (height, width))  # (B, W, H, W)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` with TransMIL's attention settings."""

    def __init__(self, *, dim: int, heads: int, num_landmarks: int | None, pinv_iterations: int, dropout: float,
                 legacy_nystrom_padding: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, heads=heads, dim_head=dim // heads,
                                     num_landmarks=num_landmarks or dim // 2, pinv_iterations=pinv_iterations,
                                     residual=True, dropout=dropout, legacy_padding=legacy_nystrom_padding)

    def forward(self, x: Tensor, *, return_attention: bool = False):
        if return_attention:
            update, factors = self.attn(self.norm(x), return_attention=True)
            return x + update, factors
        return x + self.attn(self.norm(x))


class TransMIL(SlideModel):
    """TransMIL; see the module docstring.

    Parameters
    ----------
    in_dim : int
        D (1024 in the paper).
    num_outputs : int
        C; 0 builds no ``_fc2``.
    dim : int
        W; attention uses ``heads`` heads of W // heads and W // 2 landmarks.
    heads, num_landmarks, pinv_iterations, dropout
        Nyström attention settings (8, W // 2, 6, 0.1).
    legacy_nystrom_padding : bool
        Reproduce nystrom-attention 0.0.9's misaligned outputs.
    """

    def __init__(self, *, in_dim: int, num_outputs: int, dim: int, heads: int, num_landmarks: int | None,
                 pinv_iterations: int, dropout: float, legacy_nystrom_padding: bool):
        super().__init__()
        self.embed_dim = dim
        self.num_outputs = num_outputs
        layer = dict(dim=dim, heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
                     dropout=dropout, legacy_nystrom_padding=legacy_nystrom_padding)
        self.pos_layer = PPEG(dim=dim)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(**layer)
        self.layer2 = TransLayer(**layer)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, num_outputs) if num_outputs else None

    def _slide(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """One slide's real tiles ``(1, n, D)`` → embedding ``(1, W)``, scores ``(1, n)`` (float32)."""
        n = features.shape[1]
        h, side = square_pad(self._fc1(features))  # (1, S², W)
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)  # (1, 1 + S², W)
        h = self.layer1(h)
        h = self.pos_layer(h, side, side)
        h, (left, right) = self.layer2(h, return_attention=True)  # (1, h, 1 + S², m), (1, h, m, 1 + S²)
        cls_row = (left[:, :, :1] @ right).squeeze(2).mean(1)  # (1, 1 + S²)
        copies = torch.arange(side * side - n, device=h.device) % max(n, 1)
        scores = cls_row[:, 1:1 + n].index_add(1, copies, cls_row[:, 1 + n:])  # (1, n)
        return self.norm(h)[:, 0], scores

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        mask = default_mask(features, mask)  # (B, N)
        embeddings, scores = [], []
        for b in range(features.shape[0]):
            embedding, tile_scores = self._slide(features[b:b + 1, mask[b]])
            embeddings.append(embedding[0])
            scores.append(tile_scores.new_zeros(mask.shape[1]).masked_scatter(mask[b], tile_scores[0]))
        embedding = torch.stack(embeddings)  # (B, W)
        logits = self._fc2(embedding) if self._fc2 is not None else None
        return SlideOutput(embedding=embedding, logits=logits, scores=torch.stack(scores).to(embedding.dtype))


def transmil_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """A TransMIL ``state_dict``, or a Lightning ``.ckpt`` of ``train.py`` (keys under
    ``state_dict`` with the ``model.`` prefix; that prefix is inferred, not verified)."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        checkpoint = checkpoint["state_dict"]
    if checkpoint and all(key.startswith("model.") for key in checkpoint):
        checkpoint = {re.sub(r"^model\.", "", key): value for key, value in checkpoint.items()}
    return dict(checkpoint)
