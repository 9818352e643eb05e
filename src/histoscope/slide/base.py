"""The one interface every slide-level model implements.

Notation: B slides in a batch, N tiles per slide (padded to the longest), D tile
embedding dim, E slide embedding dim, C model outputs (classes, 1 for regression or
a Cox risk, time bins for discrete-time survival).

``mask`` is True where a tile is real and False where it is padding; every model
must give the same outputs for a slide whatever padding is appended to it.
``coords`` are level-0 pixel (x, y) of each tile's top-left corner, as in the
patches/features h5 files; models that ignore positions accept them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["SlideOutput", "SlideModel"]


@dataclass
class SlideOutput:
    embedding: Tensor  # (B, E) slide embedding
    logits: Tensor | None = None  # (B, C); None for encoder-only models (num_outputs=0)
    scores: Tensor | None = None  # (B, N) per-tile attention/importance, 0 at padding
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific (e.g. CLAM instance logits)


class SlideModel(nn.Module):
    """Base class: ``forward(features (B,N,D), coords (B,N,2), mask (B,N)) -> SlideOutput``.

    Subclasses set ``embed_dim`` (E) and ``num_outputs`` (C, 0 for no head) and may
    override :meth:`auxiliary_loss` for model-specific training terms.
    """

    embed_dim: int
    num_outputs: int

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        raise NotImplementedError

    def auxiliary_loss(self, output: SlideOutput, target: Tensor) -> Tensor | None:
        """Extra loss added by the trainer (e.g. CLAM's instance clustering); ``None`` if none."""
        return None

    def layer_ids(self) -> dict[str, int] | None:
        """Depth of every parameter for layer-wise learning-rate decay, from 0 (input) to
        the largest id (top, trained at the full rate); ``None``: no layer stack to decay."""
        return None


def default_mask(features: Tensor, mask: Tensor | None) -> Tensor:
    """(B, N) bool, all True when no mask is given."""
    if mask is None:
        return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    return mask.to(dtype=torch.bool, device=features.device)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False (they get 0)."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    # At least fp32 (bf16 softmax over 10k tiles loses the small weights), float64 kept.
    compute = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.to(compute), dim=dim).to(scores.dtype)
    return weights * mask
