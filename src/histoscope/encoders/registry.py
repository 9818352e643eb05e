"""The tile-encoder registry: one frozen :class:`TileEncoderSpec` per published model.

An entry is a builder function (``**arch -> nn.Module``, built the way the authors
build it) plus data: preprocessing, native resolution, embedding size, where the
weights live and in which key layout they were published. Family modules in
``histoscope.encoders.families`` register their entries with
:func:`register_tile_encoder`; ``timm:<name>`` and ``hf-hub:<org>/<repo>`` names are
turned into specs on demand by ``histoscope.encoders.generic``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from histoscope.encoders.errors import UnknownTileEncoderError

if TYPE_CHECKING:  # specs are data: the registry never imports torch (builders do, when called)
    import torch
    from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CHECKPOINT_FORMATS",
    "Pooling",
    "Preprocess",
    "TileEncoderSpec",
    "get_tile_encoder_spec",
    "list_tile_encoders",
    "register",
    "register_tile_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Short names of the published key layouts; ``histoscope.encoders.convert`` maps each to our module names.
CHECKPOINT_FORMATS = ("timm", "hf_vit", "hf_dinov2", "ctranspath", "conch", "torchvision")
GENERIC_PREFIXES = ("timm:", "hf-hub:", "hf_hub:")

Interpolation = Literal["bilinear", "bicubic"]


@dataclass(frozen=True)
class Preprocess:
    """Published eval preprocessing: resize the shortest edge, centre-crop, normalise.

    Square tiles are resized to ``resize x resize``. ``crop=None`` keeps the resized tile.
    """

    resize: int
    crop: int | None
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', not {self.interpolation!r}")
        if self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than the resized shortest edge {self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")


@dataclass(frozen=True)
class Pooling:
    """How the embedding is read off the model's output, as the authors do it."""

    description: str
    pool: Callable[[nn.Module, Any], torch.Tensor]  # (model, model(x)) -> (B, D)
    out_dim: Callable[[nn.Module], int]  # model -> D


@dataclass(frozen=True)
class TileEncoderSpec:
    """Everything needed to build, load and feed one published tile encoder.

    ``builder(**arch)`` returns the module that the published checkpoint loads into
    (after the ``checkpoint_format`` conversion); its keyword defaults are the
    authors' architecture arguments and ``arch`` overrides them (tiny test variants).
    """

    name: str
    description: str
    builder: Callable[..., nn.Module]
    embed_dim: int
    preprocess: Preprocess
    pooling: Pooling
    native_mpp: float | None  # µm/px of the training tiles (None: unknown / natural images)
    native_tile: int  # tile side (px) read at native_mpp before preprocessing
    hf_repo: str | None  # None: not on the Hub (weights must be passed as a path)
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # tried in order
    gated: bool = False
    license: str = "unknown"
    checkpoint_format: str = "timm"
    unwrap: tuple[str, ...] = ("state_dict", "model")  # container keys holding the state dict
    homepage: str = ""

    def __post_init__(self):
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"{self.name}: unknown checkpoint_format {self.checkpoint_format!r}; "
                             f"known: {', '.join(CHECKPOINT_FORMATS)}")
        if not self.hf_filenames:
            raise ValueError(f"{self.name}: hf_filenames must name at least one file")


_REGISTRY: dict[str, TileEncoderSpec] = {}


def register(spec: TileEncoderSpec) -> TileEncoderSpec:
    """Add ``spec`` to the registry; names are unique and may not use a generic prefix."""
    if spec.name in _REGISTRY:
        raise ValueError(f"tile encoder {spec.name!r} is already registered")
    if ":" in spec.name:
        raise ValueError(f"{spec.name!r}: ':' is reserved for the {', '.join(GENERIC_PREFIXES)} prefixes")
    _REGISTRY[spec.name] = spec
    return spec


def register_tile_encoder(**fields: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register the decorated builder with the given :class:`TileEncoderSpec` fields.

    ``name`` defaults to the function name.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        register(TileEncoderSpec(**{"name": builder.__name__, **fields, "builder": builder}))
        return builder

    return decorate


def list_tile_encoders() -> list[str]:
    """Names of the registered encoders (``timm:<name>`` and ``hf-hub:<repo>`` also work)."""
    return sorted(_REGISTRY)


def get_tile_encoder_spec(name: str) -> TileEncoderSpec:
    """The spec registered as ``name``, or one made for ``timm:<model>`` / ``hf-hub:<org>/<repo>``.

    ``hf-hub:`` reads the repo's ``config.json`` (from the Hugging Face cache, or the
    Hub when online).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(GENERIC_PREFIXES):
        from histoscope.encoders import generic

        return generic.generic_spec(name)
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
    suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownTileEncoderError(
        f"no tile encoder named {name!r}.{suggestion} Registered: {', '.join(list_tile_encoders())}; "
        "any timm model works as 'timm:<model_name>' and a timm Hub repo as 'hf-hub:<org>/<repo>'."
    )
