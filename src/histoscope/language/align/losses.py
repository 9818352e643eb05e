"""CLIP's symmetric InfoNCE and CoCa's captioning loss.

Notation: B pairs, E embedding dim, T decoded positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "caption_loss"]


def clip_loss(image_embedding: torch.Tensor, text_embedding: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image→text and text→image cross-entropies over the batch.

    ``image_embedding``, ``text_embedding`` (B, E) are L2-normalised; pair i is the
    positive of row i and column i, every other row or column a negative;
    ``logit_scale`` is the (exponentiated) inverse temperature.
    """
    logits = logit_scale * image_embedding.float() @ text_embedding.float().T  # (B, B) image rows
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """Token cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T), padding ignored."""
    return F.cross_entropy(logits.float().permute(0, 2, 1), labels, ignore_index=pad_id)
