"""The :class:`TileEncoder` module and :func:`load_tile_encoder`.

Notation: N tiles in a uint8 batch, B images, D embedding dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from histoscope.encoders.convert import convert_checkpoint
from histoscope.encoders.generic import generic_spec
from histoscope.encoders.preprocess import preprocess_tiles
from histoscope.encoders.registry import (
    GENERIC_PREFIXES,
    TileEncoderSpec,
    get_tile_encoder_spec,
    list_tile_encoders,
)
from histoscope.encoders.weights import (
    RANDOM,
    clean_state_dict,
    load_weights,
    read_weights,
    resolve_weights,
    sha256_file,
)
from histoscope.io.checkpoint import compare_state_dict

__all__ = ["TileEncoder", "load_tile_encoder"]


class TileEncoder(nn.Module):
    """A published tile encoder: normalised images (B, 3, H, W) -> embeddings (B, D).

    ``transform`` applies the published preprocessing to uint8 tiles; ``forward`` is
    the reference model's forward followed by the published pooling.
    """

    def __init__(self, *, spec: TileEncoderSpec, model: nn.Module, weights_path: Path | None = None,
                 weights_sha256: str | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.embed_dim = spec.pooling.out_dim(model)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256

    def transform(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, H, W, 3) -> float32 (N, 3, h, w), preprocessed as published."""
        return preprocess_tiles(tiles, self.spec.preprocess)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) float (cast to the encoder's dtype) -> (B, D)."""
        x = x.to(dtype=next(self.model.parameters()).dtype)
        return self.spec.pooling.pool(self.model, self.model(x))

    def extra_repr(self) -> str:
        weights = self.weights_path or "random"
        return f"name={self.spec.name!r}, embed_dim={self.embed_dim}, weights={str(weights)!r}"


def _spec_for(name: str, weights) -> TileEncoderSpec:
    # an hf-hub model passed with a local snapshot folder reads that folder's config.json
    if name.startswith(GENERIC_PREFIXES[1:]) and weights not in (None, RANDOM) and Path(weights).is_dir():
        return generic_spec(name, local_dir=weights)
    return get_tile_encoder_spec(name)


def _guess_owner(state_dict: dict[str, torch.Tensor], exclude: str, arch: dict) -> str | None:
    """A hint naming the registered encoders (built with the same ``arch``) that ``state_dict`` fits exactly."""
    fits = []
    for name in list_tile_encoders():
        if name == exclude:
            continue
        spec = get_tile_encoder_spec(name)
        try:
            with torch.device("meta"):
                model = spec.builder(**arch)
            converted, foreign = convert_checkpoint(spec.checkpoint_format, state_dict, model)
        except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, AttributeError, IndexError):
            continue  # this family cannot even be built with these arguments, or the keys make no sense to it
        if not foreign and not any(compare_state_dict(model, converted)):
            fits.append(name)
    if not fits:
        return None
    names = " or ".join(repr(n) for n in fits)
    return f"Is this a checkpoint for {names}? Its tensors fit that encoder exactly."


def load_tile_encoder(name: str, *, weights: str | Path | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, token: str | bool | None = None, **arch) -> TileEncoder:
    """Build a registered tile encoder (or ``timm:<model>`` / ``hf-hub:<org>/<repo>``) with its weights.

    Parameters
    ----------
    name : registry name, e.g. ``"uni"``; see :func:`list_tile_encoders`.
    weights : None downloads from the Hugging Face Hub (through the HF cache); a file
        or snapshot folder loads local weights; ``"random"`` builds an untrained model.
    device, dtype : where and in which precision the returned module lives.
    token : Hugging Face token; by default huggingface_hub uses ``HF_TOKEN`` or the stored login.
    **arch : overrides of the builder's architecture arguments (e.g. tiny test variants).

    Returns
    -------
    TileEncoder in eval mode. Loading is strict: any missing, unexpected or wrongly
    shaped key raises :class:`~histoscope.encoders.WeightsMismatchError`.
    """
    spec = _spec_for(name, weights)
    path = resolve_weights(spec, weights, token=token)
    state_dict = clean_state_dict(read_weights(path), unwrap=spec.unwrap, path=path) if path else None
    model = spec.builder(**arch)
    if state_dict is not None:
        load_weights(model, state_dict, spec, path=path,
                     hint=lambda: _guess_owner(state_dict, exclude=spec.name, arch=arch))
    encoder = TileEncoder(spec=spec, model=model, weights_path=path,
                          weights_sha256=sha256_file(path) if path else None)
    return encoder.to(device=device, dtype=dtype).eval()
