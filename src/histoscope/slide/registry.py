"""Registry of slide-level models: a builder per name, plus tiny test variants.

``load_slide_model(name, in_dim=..., num_outputs=..., weights=..., **arch)`` builds
the registered default architecture, lets ``**arch`` override any builder keyword
(so tiny variants go through the same path), and loads weights strictly.

The registry and the built-in entries (:mod:`histoscope.slide.models`) import no
torch: listing models is instant, and a builder imports its model when called.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from histoscope.slide.base import SlideModel

__all__ = ["SlideModelSpec", "register_slide_model", "list_slide_models", "get_slide_model_spec",
           "load_slide_model", "read_checkpoint", "SlideWeightsError"]


class SlideWeightsError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into."""


@dataclass(frozen=True)
class SlideModelSpec:
    name: str
    builder: Callable[..., SlideModel]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # builder kwargs of the published model
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides giving a CPU-test-sized variant
    # Maps a published checkpoint (already torch.load-ed) to this model's state_dict keys.
    convert_checkpoint: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    paper: str = ""


_REGISTRY: dict[str, SlideModelSpec] = {}


def register_slide_model(name: str, *, description: str, defaults: dict[str, Any] | None = None,
                         tiny: dict[str, Any] | None = None, convert_checkpoint=None, paper: str = ""):
    """Decorator registering a builder ``fn(*, in_dim, num_outputs, **kwargs) -> SlideModel``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"slide model {name!r} registered twice")
        _REGISTRY[name] = SlideModelSpec(name, builder, description, dict(defaults or {}), dict(tiny or {}),
                                         convert_checkpoint, paper)
        return builder

    return wrap


def _ensure_registered() -> None:
    import histoscope.slide.models  # noqa: F401  (registers the built-in families)


def list_slide_models() -> list[str]:
    _ensure_registered()
    return sorted(_REGISTRY)


def get_slide_model_spec(name: str) -> SlideModelSpec:
    _ensure_registered()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown slide model {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def load_slide_model(name: str, *, in_dim: int, num_outputs: int = 0, weights: str | Path | None = None,
                     tiny: bool = False, new_head: bool = False, **arch: Any) -> SlideModel:
    """Build a registered slide model and (optionally) load a checkpoint strictly.

    Parameters
    ----------
    name : str
        Registry name (``histoscope models --kind slide``).
    in_dim : int
        Tile embedding dim D of the features it will read.
    num_outputs : int
        Size C of the prediction head; 0 builds the encoder only.
    weights : path, optional
        A checkpoint as its authors publish it (converted by the spec's
        ``convert_checkpoint``) or as ``histoscope train`` writes it.
    tiny : bool
        Use the registered tiny test variant (then ``**arch`` on top).
    new_head : bool
        The checkpoint is an encoder without this task's head (e.g. the published
        Prov-GigaPath slide encoder, to be fine-tuned): the ``head.*`` parameters
        keep their fresh initialisation; every other key must still match.
    """
    spec = get_slide_model_spec(name)
    kwargs = {**spec.defaults, **(spec.tiny if tiny else {}), **arch}
    model = spec.builder(in_dim=in_dim, num_outputs=num_outputs, **kwargs)
    if weights is not None:
        load_slide_weights(model, weights, spec, new_head=new_head)
    return model


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a checkpoint safely (tensors and plain containers only), with
    errors that name the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        # DINO-style training checkpoints (HIPT) also pickle their argparse arguments.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unexpected pickled classes, …
        raise SlideWeightsError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from error


def load_slide_weights(model: SlideModel, weights: str | Path, spec: SlideModelSpec | None = None, *,
                       new_head: bool = False) -> None:
    path = Path(weights)
    checkpoint = read_checkpoint(path)
    if isinstance(checkpoint, dict) and "histoscope_model" in checkpoint:
        state = checkpoint["state_dict"]
    elif spec is not None and spec.convert_checkpoint is not None:
        state = spec.convert_checkpoint(checkpoint)
    else:
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint)) if isinstance(checkpoint, dict) else checkpoint
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if new_head:
        missing = [key for key in missing if not key.startswith("head.")]
    if missing or unexpected:
        raise SlideWeightsError(
            f"{path} does not fit {type(model).__name__}"
            + (f" ({spec.name})" if spec else "")
            + f": {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}. "
            "Is it a checkpoint of this model with these architecture settings?"
            + (" To fine-tune an encoder-only checkpoint with a new head, pass new_head=True."
               if missing and all(k.startswith("head.") for k in missing) else "")
        )
