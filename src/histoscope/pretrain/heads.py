"""DINOv2's projection head: MLP -> L2 normalisation -> weight-normalised prototypes.

Notation: T tokens, C backbone width, H hidden, b bottleneck, K prototypes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """(T, C) tokens -> (T, K) prototype scores, as ``dinov2/layers/dino_head.py``.

    ``nlayers`` linear layers (GELU between them) map C -> H -> ... -> b; the last layer
    is weight-normalised with its gain initialised to 1 (and trained). MLP weights start
    as truncated normals (std 0.02) with zero biases.
    """

    def __init__(self, *, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers: list[nn.Module] = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)  # the gain g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (T, b)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (T, K)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
