"""Attention-based MIL (Ilse et al. 2018) with CLAM's trunk and parameter names.

Notation: B slides, N tiles, D tile dim, H trunk width (512), A attention width,
K attention branches (1, or C for CLAM-MB), C outputs.

``attention_net = [Linear(D, H), ReLU, Dropout(p), (Gated)AttentionNet(H → A → K)]``
as in CLAM's ``CLAM_SB`` (keys ``attention_net.0.*`` and ``attention_net.3.*``), then
``M = softmax_N(a)ᵀ h`` and ``classifiers = Linear(H, C)``. The softmax runs over the
real tiles only. CLAM's own "ABMIL" baseline is ``CLAM_SB`` trained without the
instance loss and is always gated; the ungated net is Ilse et al.'s original form.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from histoscope.layers.gated_attention import AttentionNet, GatedAttentionNet
from histoscope.slide.base import SlideModel, SlideOutput, default_mask, masked_softmax

__all__ = ["ABMIL", "CLAM_SIZES", "abmil_state_dict", "clam_state_dict"]

# CLAM's size_arg → (H, A)
CLAM_SIZES = {"small": (512, 256), "big": (512, 384)}
# The attention nets' dropout is fixed at 0.25 whenever dropout is on (CLAM's Attn_Net*).
_ATTENTION_DROPOUT = 0.25


class ABMIL(SlideModel):
    """Attention MIL; ``num_branches > 1`` gives one attention row and one scalar
    classifier per output (CLAM-MB's layout).

    Parameters
    ----------
    in_dim : int
        D.
    num_outputs : int
        C; 0 builds no classifier.
    hidden_dim, attn_dim : int
        H and A.
    gated : bool
        Gated (``Attn_Net_Gated``) or plain tanh (``Attn_Net``) attention.
    dropout : float
        Dropout after the trunk ReLU; when > 0 the attention net also gets CLAM's
        fixed 0.25 dropout.
    num_branches : int
        K.
    """

    def __init__(self, *, in_dim: int, num_outputs: int, hidden_dim: int, attn_dim: int, gated: bool, dropout: float,
                 num_branches: int = 1):
        super().__init__()
        self.embed_dim = hidden_dim
        self.num_outputs = num_outputs
        self.num_branches = num_branches
        net = GatedAttentionNet if gated else AttentionNet
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            net(in_dim=hidden_dim, hidden_dim=attn_dim, num_branches=num_branches,
                dropout=_ATTENTION_DROPOUT if dropout else 0.0))
        if num_outputs == 0:
            self.classifiers = None
        elif num_branches == 1:
            self.classifiers = nn.Linear(hidden_dim, num_outputs)
        else:
            self.classifiers = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(num_outputs))

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        """``extras``: ``attention`` (B, K, N) softmax weights, ``attention_logits``
        (B, K, N) pre-softmax (-inf at padding; CLAM's ``A_raw``, used for heatmaps),
        ``tile_features`` (B, N, H), ``mask`` (B, N) and, when K > 1,
        ``branch_embeddings`` (B, K, H)."""
        mask = default_mask(features, mask)  # (B, N)
        features = features.masked_fill(~mask.unsqueeze(-1), 0)  # padding may hold anything, even NaN
        h = self.attention_net[:3](features)  # (B, N, H)
        logits_a = self.attention_net[3](h).transpose(1, 2)  # (B, K, N)
        attention = masked_softmax(logits_a, mask.unsqueeze(1))  # (B, K, N)
        pooled = attention @ h  # (B, K, H)

        if self.classifiers is None:
            logits = None
        elif isinstance(self.classifiers, nn.Linear):
            logits = self.classifiers(pooled[:, 0])  # (B, C)
        else:
            logits = torch.cat([clf(pooled[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)  # (B, C)

        extras = {"attention": attention, "attention_logits": logits_a.masked_fill(~mask.unsqueeze(1), float("-inf")),
                  "tile_features": h, "mask": mask}
        if self.num_branches > 1:
            extras["branch_embeddings"] = pooled
        # K > 1: the slide embedding and tile scores average the class branches
        return SlideOutput(embedding=pooled.mean(1), logits=logits, scores=attention.mean(1), extras=extras)


def clam_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """A CLAM checkpoint as published → this package's CLAM/ABMIL keys.

    Handles what ``eval_utils.initiate_model`` handles (DataParallel ``.module`` in
    ``attention_net.module.*``, the SmoothTop1SVM buffer ``instance_loss_fn.*``) plus
    a wrapping ``{"state_dict": ...}``, a leading ``module.``, and the pre-2022 layout
    without the trunk Dropout (attention net at index 2 instead of 3). Unlike CLAM's
    blanket ``replace('.module', '')`` it keeps the ungated net's own ``module.*``.
    """
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        checkpoint = checkpoint["state_dict"]
    state = {}
    for key, value in checkpoint.items():
        if "instance_loss_fn" in key:
            continue
        key = re.sub(r"^module\.", "", key)
        key = key.replace("attention_net.module.", "attention_net.")
        key = re.sub(r"^attention_net\.2\.(?=attention_[abc]\.|module\.)", "attention_net.3.", key)
        state[key] = value
    return state


def abmil_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """As :func:`clam_state_dict`, without instance classifiers: a CLAM_SB run with
    ``--no_inst_cluster`` still saves its (untrained) ones."""
    return {k: v for k, v in clam_state_dict(checkpoint).items() if not k.startswith("instance_classifiers.")}
