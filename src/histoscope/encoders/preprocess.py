"""The published eval preprocessing, applied to uint8 tile batches.

Matches torchvision's ``Resize(size) -> CenterCrop(crop) -> ToTensor -> Normalize``
on uint8 tensors: the resize runs on uint8 with antialiasing (the kernel torchvision
itself uses on CPU), so the intermediate image is quantised exactly as in the
authors' PIL/torchvision pipelines.

Notation: N tiles, H x W input size, h x w output size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histoscope.encoders.registry import Preprocess

__all__ = ["normalize_tiles", "preprocess_tiles", "resize_tiles", "resized_size"]


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize, rounded as torchvision does (long side floored)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    # x (N, 3, H, W) uint8
    if tuple(x.shape[-2:]) == size:
        return x
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    # no uint8 antialias kernel off-CPU: resize in float and quantise like torchvision does there
    y = F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True)
    return y.clamp_(0, 255).round_().to(torch.uint8)


def _center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return x[..., top : top + crop, left : left + crop]


def preprocess_tiles(tiles: np.ndarray | torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """``tiles`` (N, H, W, 3) uint8 RGB -> (N, 3, h, w) float32, normalised.

    A single tile (H, W, 3) is accepted and returned as a batch of one. The same as
    :func:`normalize_tiles` of :func:`resize_tiles`, which a pipeline can run apart: the
    geometry where tiles are decoded, the normalisation on the model's device.
    """
    return normalize_tiles(resize_tiles(tiles, preprocess), preprocess).contiguous()  # (N, 3, h, w)


def resize_tiles(tiles: np.ndarray | torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """``tiles`` (N, H, W, 3) uint8 RGB -> (N, 3, h, w) uint8, resized and cropped, channels-last
    in memory (a quarter of the bytes of the float batch, for the trip to the model's device)."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    if x.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8 RGB, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"tiles must have shape (N, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)  # (N, 3, H, W), channels-last in memory
    x = _resize(x, resized_size(x.shape[-2], x.shape[-1], preprocess.resize), preprocess.interpolation)
    if preprocess.crop is not None:
        x = _center_crop(x, preprocess.crop)
    return x.contiguous(memory_format=torch.channels_last)


def normalize_tiles(x: torch.Tensor, preprocess: Preprocess, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, h, w) uint8 -> the model's input in ``dtype``: ``(x / 255 - mean) / std`` computed
    in float32 (torchvision's ``ToTensor`` + ``Normalize``) on ``x``'s device, memory layout kept."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    y = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)  # in place: one float buffer
    return y if dtype == torch.float32 else y.to(dtype)
