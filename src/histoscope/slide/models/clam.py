"""CLAM-SB / CLAM-MB (Lu et al. 2021): gated attention MIL plus instance clustering.

Notation: B slides, N tiles, H trunk width, K attention branches (1 for SB, C for
MB), C classes, k = ``k_sample``.

The bag part is :class:`~histoscope.slide.models.abmil.ABMIL` (SB: one attention row
and ``classifiers = Linear(H, C)``; MB: one row and one ``Linear(H, 1)`` per class).
CLAM adds ``instance_classifiers`` (one ``Linear(H, 2)`` per class) trained by
:meth:`CLAM.auxiliary_loss`: for the true class c of a slide, the k most and k least
attended tiles of attention row c (the single row in SB) are labelled 1 and 0; with
``subtyping`` the k most attended tiles of every other class's row are labelled 0
and the sum is divided by C. The trainer combines
``bag_weight * bag_loss + (1 - bag_weight) * auxiliary_loss`` with ``model.bag_weight``
(0.7 in CLAM).

Deviations from the reference: bags with fewer than k real tiles use k = n (CLAM's
``topk`` fails); padding is never sampled; with B > 1 the loss is the mean over
slides (CLAM trains with one slide per batch). Only the cross-entropy instance loss
is implemented, not the optional SmoothTop1SVM (``--inst_loss svm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histoscope.slide.base import SlideOutput
from histoscope.slide.models.abmil import ABMIL, CLAM_SIZES

__all__ = ["CLAM", "clam_widths"]


class CLAM(ABMIL):
    """CLAM; see the module docstring.

    Parameters
    ----------
    in_dim, num_outputs, hidden_dim, attn_dim, gated, dropout
        As for :class:`ABMIL`.
    multi_branch : bool
        CLAM-MB (one attention branch and one bag classifier per class).
    k_sample : int
        k tiles per side for the instance loss (CLAM's ``--B``).
    subtyping : bool
        Also push the top tiles of the other classes' branches to "negative".
    bag_weight : float
        Weight of the bag loss; stored for the trainer, unused by the model.
    """

    def __init__(self, *, in_dim: int, num_outputs: int, hidden_dim: int, attn_dim: int, gated: bool, dropout: float,
                 multi_branch: bool, k_sample: int, subtyping: bool, bag_weight: float):
        if multi_branch and num_outputs < 1:
            raise ValueError("CLAM-MB needs num_outputs >= 1: it has one attention branch per class")
        super().__init__(in_dim=in_dim, num_outputs=num_outputs, hidden_dim=hidden_dim, attn_dim=attn_dim,
                         gated=gated, dropout=dropout, num_branches=num_outputs if multi_branch else 1)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(num_outputs))
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.bag_weight = bag_weight

    def auxiliary_loss(self, output: SlideOutput, target: Tensor) -> Tensor | None:
        """Instance-clustering loss, averaged over the slides that have real tiles.

        ``target (B,)`` integer class labels; ``None`` for a model without classes.
        """
        if self.num_outputs == 0:
            return None
        if target.is_floating_point() or target.numel() != output.embedding.shape[0]:
            raise ValueError(f"CLAM's instance loss needs one integer class label per slide, got a "
                             f"{target.dtype} target of shape {tuple(target.shape)}")
        scores = output.extras["attention_logits"]  # (B, K, N), order equals the softmax order
        tiles = output.extras["tile_features"]  # (B, N, H)
        mask = output.extras["mask"]  # (B, N)
        losses = []
        for b, label in enumerate(target.reshape(-1).tolist()):
            real = mask[b]
            n = int(real.sum())
            if n == 0:
                continue
            k = min(self.k_sample, n)
            h = tiles[b][real]  # (n, H)
            loss = 0.0
            for c, classifier in enumerate(self.instance_classifiers):
                row = scores[b, c if self.num_branches > 1 else 0][real]  # (n,)
                if c == label:
                    chosen = torch.cat([row.topk(k).indices, (-row).topk(k).indices])
                    targets = torch.cat([row.new_ones(k), row.new_zeros(k)]).long()
                elif self.subtyping:
                    chosen = row.topk(k).indices
                    targets = row.new_zeros(k).long()
                else:
                    continue
                loss = loss + F.cross_entropy(classifier(h[chosen]), targets)
            if self.subtyping:
                loss = loss / self.num_outputs
            losses.append(loss)
        if not losses:
            return output.embedding.new_zeros(())
        return torch.stack(losses).mean()


def clam_widths(size: str, hidden_dim: int | None, attn_dim: int | None) -> dict[str, int]:
    """``hidden_dim`` and ``attn_dim`` of CLAM's ``size_arg``, unless given."""
    if size not in CLAM_SIZES:
        raise ValueError(f"unknown CLAM size {size!r}; use one of {sorted(CLAM_SIZES)}")
    default_hidden, default_attn = CLAM_SIZES[size]
    return {"hidden_dim": hidden_dim or default_hidden, "attn_dim": attn_dim or default_attn}
