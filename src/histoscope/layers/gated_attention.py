"""Attention-MIL scoring networks (Ilse et al. 2018), in CLAM's parameter layout.

Notation: N tiles, L input dim, D hidden dim, K attention branches.

Both nets map tile features ``(..., N, L)`` to unnormalised attention logits
``(..., N, K)``; the softmax over tiles (and its masking) is the caller's job.
Sub-module names follow CLAM's ``Attn_Net`` / ``Attn_Net_Gated`` (``module.*``,
``attention_a.0.*``, ``attention_b.0.*``, ``attention_c.*``) so CLAM checkpoints load
as they are; like CLAM, the dropout layer exists only when ``dropout > 0``, which
shifts the last Linear of the ungated net from ``module.2`` to ``module.3``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AttentionNet", "GatedAttentionNet"]


def _maybe_dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


class AttentionNet(nn.Module):
    """``a = w·tanh(V h) + b`` (CLAM ``Attn_Net``).

    Parameters
    ----------
    in_dim : int
        L, tile feature dim.
    hidden_dim : int
        D, width of the tanh layer.
    num_branches : int
        K, number of attention logits per tile (one per class in CLAM-MB).
    dropout : float
        Dropout after the tanh; no layer at all when 0.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, num_branches: int = 1, dropout: float = 0.0):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), *_maybe_dropout(dropout),
                                    nn.Linear(hidden_dim, num_branches))

    def forward(self, h: Tensor) -> Tensor:
        return self.module(h)  # (..., N, K)


class GatedAttentionNet(nn.Module):
    """``a = w·(tanh(V h) ⊙ sigmoid(U h)) + b`` (CLAM ``Attn_Net_Gated``).

    Parameters are as for :class:`AttentionNet`; the dropout follows both the tanh
    and the sigmoid branch.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, num_branches: int = 1, dropout: float = 0.0):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), *_maybe_dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), *_maybe_dropout(dropout))
        self.attention_c = nn.Linear(hidden_dim, num_branches)

    def forward(self, h: Tensor) -> Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))  # (..., N, K)
