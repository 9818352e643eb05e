"""Parameter-free baselines: masked mean and max of the tile embeddings (+ a Linear head).

Notation: B slides, N tiles, D tile dim, C outputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from histoscope.slide.base import SlideModel, SlideOutput, default_mask

__all__ = ["MeanPool", "MaxPool"]


class _Pool(SlideModel):
    def __init__(self, *, in_dim: int, num_outputs: int):
        super().__init__()
        self.embed_dim = in_dim
        self.num_outputs = num_outputs
        self.head = nn.Linear(in_dim, num_outputs) if num_outputs else None

    def _output(self, embedding: Tensor, scores: Tensor) -> SlideOutput:
        logits = self.head(embedding) if self.head is not None else None
        return SlideOutput(embedding=embedding, logits=logits, scores=scores)


class MeanPool(_Pool):
    """Mean of the real tiles; scores are the uniform weights ``1/n`` (0 at padding)."""

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        mask = default_mask(features, mask)  # (B, N)
        count = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        weights = mask.to(features.dtype) / count  # (B, N)
        embedding = features.masked_fill(~mask.unsqueeze(-1), 0).sum(1) / count  # (B, D)
        return self._output(embedding, weights)


class MaxPool(_Pool):
    """Per-dimension max over the real tiles (0 for a slide with none); a tile's score
    is the fraction of dimensions whose max it holds."""

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        mask = default_mask(features, mask)  # (B, N)
        filled = features.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        embedding, winner = filled.max(1)  # (B, D), (B, D) tile index per dim
        embedding = embedding.masked_fill(~mask.any(1, keepdim=True), 0)
        scores = features.new_zeros(mask.shape).scatter_add_(1, winner, features.new_ones(winner.shape))
        scores = (scores / features.shape[-1]) * mask
        return self._output(embedding, scores)
