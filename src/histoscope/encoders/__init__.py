"""Tile encoders: published pathology foundation models behind one interface.

``load_tile_encoder(name)`` returns a :class:`TileEncoder` mapping normalised images
``(B, 3, H, W)`` to embeddings ``(B, D)``, with the published preprocessing as
``encoder.transform`` and the weights loaded strictly from the Hugging Face Hub or
a local file.

The registry (names and specs) is importable without torch, so ``histoscope models``
lists it in an instant; the modules that build and run encoders are imported on
first use.
"""

from histoscope.encoders import families as _families  # noqa: F401  (registers the built-in encoders)
from histoscope.encoders.errors import (
    CorruptWeightsError,
    UnknownTileEncoderError,
    WeightsAccessError,
    WeightsError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from histoscope.encoders.registry import (
    Pooling,
    Preprocess,
    TileEncoderSpec,
    get_tile_encoder_spec,
    list_tile_encoders,
    register,
    register_tile_encoder,
)

__all__ = [
    "CorruptWeightsError",
    "Pooling",
    "Preprocess",
    "TileEncoder",
    "TileEncoderSpec",
    "UnknownTileEncoderError",
    "WeightsAccessError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "get_tile_encoder_spec",
    "list_tile_encoders",
    "load_tile_encoder",
    "preprocess_tiles",
    "register",
    "register_tile_encoder",
]

_LAZY = {"TileEncoder": "encoder", "load_tile_encoder": "encoder", "preprocess_tiles": "preprocess"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
