"""Survival losses: Cox partial likelihood (Breslow ties) and discrete-time NLL.

Notation: B slides, K time bins. ``risk`` (B,) is a log hazard ratio (higher = dies
sooner); ``logits`` (B, K) are per-bin hazard logits, h_k = sigmoid(logit_k).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cox_loss", "discrete_time_nll", "time_bins", "time_bin_index"]


def cox_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative log partial likelihood, averaged over events, with Breslow's handling of ties.

    Each event i contributes ``risk_i - log Σ_{j: t_j >= t_i} exp(risk_j)``: slides that
    die at the same time all keep each other in their risk sets (Breslow). A batch
    without events gives a zero that still depends on ``risk`` (so backward works).
    """
    risk = risk.float().reshape(-1)
    time = time.reshape(-1)
    events = event.reshape(-1).bool()
    if not events.any():
        return risk.sum() * 0.0
    at_risk = time[None, :] >= time[:, None]  # (B, B): row i holds i's risk set
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk - log_denominator)[events].mean()


def time_bins(event_times: np.ndarray, bins: int) -> np.ndarray:
    """``bins - 1`` cut points at the quantiles of the event times (bin k is [cut_{k-1}, cut_k))."""
    event_times = np.asarray(event_times, dtype=np.float64)
    if len(event_times) == 0:
        raise ValueError("no events to place time bins at; use the Cox loss or more data")
    return np.quantile(event_times, np.arange(1, bins) / bins)


def time_bin_index(time: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(cuts, dtype=np.float64), np.asarray(time, dtype=np.float64), side="right")


def discrete_time_nll(logits: Tensor, bin_index: Tensor, event: Tensor) -> Tensor:
    """Mean negative log-likelihood of a discrete-time hazard model.

    A slide with an event in bin j contributes ``-[Σ_{k<j} log(1-h_k) + log h_j]``; one
    censored in bin j survived it: ``-Σ_{k<=j} log(1-h_k)``.
    """
    logits = logits.float()
    bin_index = bin_index.long().reshape(-1, 1)
    event = event.float().reshape(-1)
    log_survive = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, K) log S after bin k
    log_survive_before = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive[:, :-1]], dim=1)
    log_hazard = F.logsigmoid(logits)
    died = -(log_survive_before.gather(1, bin_index) + log_hazard.gather(1, bin_index)).squeeze(1)
    survived = -log_survive.gather(1, bin_index).squeeze(1)
    return (event * died + (1 - event) * survived).mean()
