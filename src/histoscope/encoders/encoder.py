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
    random_seed,
    read_weights,
    resolve_weights,
    sha256_file,
    state_dict_sha256,
)
from histoscope.io.checkpoint import compare_state_dict

__all__ = ["TileEncoder", "load_tile_encoder"]


class TileEncoder(nn.Module):
    """A published tile encoder: normalised images (B, 3, H, W) -> embeddings (B, D).

    ``transform`` applies the published preprocessing to uint8 tiles; ``forward`` is
    the reference model's forward followed by the published pooling.
    """

    def __init__(self, *, spec: TileEncoderSpec, model: nn.Module, weights_path: Path | None = None,
                 weights_sha256: str | None = None, weights_seed: int | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.embed_dim = spec.pooling.out_dim(model)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.weights_seed = weights_seed  # random weights: their seed

    @property
    def weights_source(self) -> str:
        """Where the weights came from: their file, or ``random:SEED``."""
        return str(self.weights_path) if self.weights_path is not None else f"{RANDOM}:{self.weights_seed}"

    def transform(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, H, W, 3) -> float32 (N, 3, h, w), preprocessed as published."""
        return preprocess_tiles(tiles, self.spec.preprocess)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) float (cast to the encoder's dtype) -> (B, D)."""
        x = x.to(dtype=next(self.model.parameters()).dtype)
        return self.spec.pooling.pool(self.model, self.model(x))

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) -> the tokens before pooling (B, P, C): a ViT's patch tokens after
        its final norm (class and register tokens left out), a CNN's last feature map as h·w tokens."""
        x = x.to(dtype=next(self.model.parameters()).dtype)
        if hasattr(self.model, "num_prefix_tokens") and hasattr(self.model, "forward_features"):
            return self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        out = self.model.forward_features(x) if hasattr(self.model, "forward_features") else self.model(x)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        if out.ndim != 4:
            raise ValueError(f"tile encoder {self.spec.name!r} gives no patch tokens (its features have shape "
                             f"{tuple(out.shape)}); use a ViT or CNN encoder")
        return out.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h·w, C)

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, embed_dim={self.embed_dim}, weights={self.weights_source!r}"


def _spec_for(name: str, weights) -> TileEncoderSpec:
    # an hf-hub model passed with a local snapshot folder reads that folder's config.json
    if name.startswith(GENERIC_PREFIXES[1:]) and weights is not None and random_seed(weights) is None \
            and Path(weights).is_dir():
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
        or snapshot folder loads local weights; ``"random"`` builds an untrained model
        from seed 0 (``"random:SEED"`` from another), the same in every process.
    device, dtype : where and in which precision the returned module lives.
    token : Hugging Face token; by default huggingface_hub uses ``HF_TOKEN`` or the stored login.
    **arch : overrides of the builder's architecture arguments (e.g. tiny test variants).

    Returns
    -------
    TileEncoder in eval mode. Loading is strict: any missing, unexpected or wrongly
    shaped key raises :class:`~histoscope.encoders.WeightsMismatchError`.
    """
    spec = _spec_for(name, weights)
    seed = random_seed(weights)
    path = resolve_weights(spec, weights, token=token)
    state_dict = clean_state_dict(read_weights(path), unwrap=spec.unwrap, path=path) if path else None
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed or 0)
        model = _build(spec, arch)
    if state_dict is not None:
        load_weights(model, state_dict, spec, path=path,
                     hint=lambda: _guess_owner(state_dict, exclude=spec.name, arch=arch))
    encoder = TileEncoder(spec=spec, model=model, weights_path=path, weights_seed=seed,
                          weights_sha256=sha256_file(path) if path else state_dict_sha256(model))
    return encoder.to(device=device, dtype=dtype).eval()


def _build(spec: TileEncoderSpec, arch: dict):
    """``spec.builder(**arch)``; an argument the architecture does not have is a clear error."""
    try:
        return spec.builder(**arch)
    except TypeError as error:
        if not arch or "argument" not in str(error):
            raise
        raise ValueError(f"tile encoder '{spec.name}': architecture override(s) "
                         f"{', '.join(f'{k}={v!r}' for k, v in arch.items()) or '(none)'} (--arch) do not fit its "
                         f"builder ({error}); check the names against the model's constructor") from None
