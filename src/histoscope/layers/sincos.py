"""Fixed sine-cosine position embeddings (Transformer / MAE form), computed on demand.

``sincos_1d(p, D) = [sin(p·ω), cos(p·ω)]`` with ``ω_t = 10000^(-t/(D/2))``,
t = 0 … D/2-1: sines first, then cosines (MAE's ``get_1d_sincos_pos_embed_from_grid``).
``sincos_2d(col, row, D) = [sincos_1d(col, D/2), sincos_1d(row, D/2)]``, MAE's
``get_2d_sincos_pos_embed`` row for the grid cell (row, col): the first half encodes
the fast-running index of its row-major table.

Values are computed in float64 like the NumPy originals, then cast, so they match
a precomputed table to the last bit of the target dtype without storing one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """positions (...) → (..., dim) float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64).unsqueeze(-1) * omega  # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d(col: Tensor, row: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer grid indices col, row (...) → (..., dim) in ``dtype``.

    Built from one float64 table over the range of indices present, so the float64
    work is O(range · dim), not O(count · dim).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    if col.numel() == 0:
        return torch.zeros(*col.shape, dim, dtype=dtype, device=col.device)
    low, high = (int(v) for v in torch.aminmax(torch.stack([col.min(), row.min(), col.max(), row.max()])))
    table = sincos_1d(torch.arange(low, high + 1, device=col.device), dim // 2).to(dtype)  # (range, dim/2)
    return torch.cat([table[col.long() - low], table[row.long() - low]], dim=-1)
