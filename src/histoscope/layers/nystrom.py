"""Nyström self-attention (Xiong et al. 2021), in the ``nystrom-attention`` layout.

Notation: B batch, n tokens, n' = n rounded up to a multiple of m (front-padded
with zeros), m landmarks, h heads, d head dim.

Softmax attention ``S V`` is approximated by ``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ))
· softmax(Q̃ Kᵀ) V`` where the landmarks Q̃, K̃ are means of m consecutive groups of
tokens, plus a depthwise convolution of V along the sequence as a residual. Parameter
names match ``nystrom_attention.NystromAttention`` (``to_qkv``, ``to_out.0``,
``res_conv``) so TransMIL checkpoints load unchanged.

Padding and the 0.0.9 bug: the sequence is padded at the *front* to n'. Version 0.0.9
(the one TransMIL pins) then kept the *first* n outputs, so output row i belongs to
padded position i, i.e. real token i - p (p pad rows); the cls slot of TransMIL gets a
pad row's output whenever p > 0. 0.0.10 keeps the last n rows (the real tokens).
``legacy_padding=True`` reproduces 0.0.9 for parity with published TransMIL results.

The landmark softmaxes and the iterative pseudo-inverse run in (at least) float32 (with autocast
off): the Newton–Schulz-type iteration multiplies near-singular matrices and drifts
badly in bf16/fp16. Its initial scale is a single scalar over the whole batch and all
heads, as in the reference, so slides in one batch influence each other slightly;
callers wanting per-slide independence run one slide per call (TransMIL does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NystromAttention", "moore_penrose_pinv"]


def moore_penrose_pinv(x: Tensor, iterations: int = 6) -> Tensor:
    """Iterative pseudo-inverse of ``x (..., m, m)`` (Razavi et al. 2014).

    ``z₀ = xᵀ / (max row-sum |x| · max col-sum |x|)`` with both maxima global scalars
    over every leading dim, then ``z ← ¼ z (13I − xz(15I − xz(7I − xz)))``.
    """
    magnitude = x.abs()
    z = x.transpose(-1, -2) / (magnitude.sum(-1).amax() * magnitude.sum(-2).amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention ``(B, n, dim) -> (B, n, dim)``.

    Parameters
    ----------
    dim : int
        Token width.
    heads, dim_head : int
        h and d; ``to_qkv`` maps dim → 3·h·d without bias.
    num_landmarks : int
        m; the sequence is front-padded to a multiple of m.
    pinv_iterations : int
        Iterations of :func:`moore_penrose_pinv`.
    residual : bool
        Add a depthwise conv of V along the sequence (kernel ``residual_conv_kernel``).
    dropout : float
        Dropout after the output projection.
    legacy_padding : bool
        Keep the first n rows of the padded output (nystrom-attention 0.0.9) instead
        of the n rows of the real tokens. See the module docstring.
    """

    def __init__(self, *, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0, legacy_padding: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.legacy_padding = legacy_padding
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual:
            self.res_conv = nn.Conv2d(heads, heads, (residual_conv_kernel, 1), padding=(residual_conv_kernel // 2, 0),
                                      groups=heads, bias=False)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x (B, n, dim)`` → ``(B, n, dim)``.

        With ``return_attention`` also returns the two factors of the approximate
        attention matrix, ``left (B, h, n, m)`` (rows aligned with the returned output
        rows) and ``right (B, h, m, n)`` (columns aligned with the input tokens), so
        that ``left[..., i, :] @ right`` is the attention row behind output row i
        without materialising the n × n matrix. The conv residual is not included.
        """
        n = x.shape[1]
        m = self.num_landmarks
        pad = (-n) % m
        x = F.pad(x, (0, 0, pad, 0))  # (B, n', dim), zeros in front
        group = (n + pad) // m

        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        # keep: the output rows returned (see module docstring on the 0.0.9 bug)
        keep = slice(0, n) if self.legacy_padding else slice(pad, pad + n)

        wide = torch.promote_types(v.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
        with torch.autocast(device_type=x.device.type, enabled=False):
            qf, kf, vf = q.to(wide) * self.scale, k.to(wide), v.to(wide)  # (B, h, n', d)
            q_land = qf.unflatten(2, (m, group)).mean(3)  # (B, h, m, d)
            k_land = kf.unflatten(2, (m, group)).mean(3)
            attn1 = torch.softmax(qf[:, :, keep] @ k_land.transpose(-1, -2), dim=-1)  # (B, h, n, m)
            attn2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # (B, h, m, m)
            attn3 = torch.softmax(q_land @ kf.transpose(-1, -2), dim=-1)  # (B, h, m, n')
            left = attn1 @ moore_penrose_pinv(attn2, self.pinv_iterations)  # (B, h, n, m)
            out = (left @ (attn3 @ vf)).to(v.dtype)  # (B, h, n, d)

        if self.res_conv is not None:
            out = out + self.res_conv(v)[:, :, keep]
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (B, n, dim)
        if return_attention:
            return out, (left, attn3[..., pad:])
        return out
