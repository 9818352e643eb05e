"""How each family reads its embedding off the model output.

Notation: B tiles, T tokens (prefix + patch), C channels, D embedding dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoscope.encoders.registry import Pooling

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["CLS_MEAN_PATCH", "FEATURE_MAP_MEAN", "MODEL_OUTPUT"]


def _identity(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out  # (B, D)


def _cls_mean_patch(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    # tokens (B, T, C); prefix = class token + register tokens, which the model cards exclude from the mean
    import torch

    patches = tokens[:, model.num_prefix_tokens :]
    return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # (B, 2C)


def _feature_map_mean(model: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
    return maps[-1].mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)


MODEL_OUTPUT = Pooling(
    description="model(x): the model's own pooled output (for ViTs the class token after the final norm)",
    pool=_identity,
    out_dim=lambda model: model.num_features,
)
CLS_MEAN_PATCH = Pooling(
    description="concat(class token, mean of patch tokens), register tokens excluded (model.num_prefix_tokens)",
    pool=_cls_mean_patch,
    out_dim=lambda model: 2 * model.num_features,
)
FEATURE_MAP_MEAN = Pooling(
    description="global average pool of the last feature map",
    pool=_feature_map_mean,
    out_dim=lambda model: model.feature_info.channels()[-1],
)
