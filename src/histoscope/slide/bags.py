"""Bags of tile features batched for a slide model, as training and inference feed them.

Notation: B bags, N tiles (the longest bag), D feature dim.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["collate_bags"]


def collate_bags(bags: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``(features (N_i, D), coords (N_i, 2))`` bags to the longest:
    ``features (B, N, D) float32, coords (B, N, 2) float32, mask (B, N) bool`` (True at real tiles)."""
    longest = max(len(f) for f, _ in bags)
    dim = bags[0][0].shape[1]
    features = torch.zeros(len(bags), longest, dim, dtype=torch.float32)
    coords = torch.zeros(len(bags), longest, 2, dtype=torch.float32)
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, (f, c) in enumerate(bags):
        features[i, : len(f)] = torch.from_numpy(f)
        coords[i, : len(c)] = torch.from_numpy(c.astype(np.float32))
        mask[i, : len(f)] = True
    return features, coords, mask
