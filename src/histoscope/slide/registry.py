"""Registry of slide-level models: a builder per name, plus tiny test variants.

``load_slide_model(name, in_dim=..., num_outputs=..., weights=..., **arch)`` builds
the registered default architecture, lets ``**arch`` override any builder keyword
(so tiny variants go through the same path), and loads weights strictly.

The registry and the built-in entries (:mod:`histoscope.slide.models`) import no
torch: listing models is instant, and a builder imports its model when called.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscope.io.checkpoint import checkpoint_kind, compare_state_dict, read_checkpoint

if TYPE_CHECKING:
    import torch

    from histoscope.slide.base import SlideModel

__all__ = ["SlideModelSpec", "register_slide_model", "list_slide_models", "get_slide_model_spec",
           "load_slide_model", "SlideWeightsError"]


class SlideWeightsError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into."""


@dataclass(frozen=True)
class SlideModelSpec:
    name: str
    builder: Callable[..., SlideModel]
    description: str
    # Modules whose parameters depend on the task's outputs (their number or meaning):
    # left out of the encoder when fine-tuning with new_head, trained when freeze_encoder.
    head: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)  # builder kwargs of the published model
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides giving a CPU-test-sized variant
    # Maps a published checkpoint (as read_checkpoint returns it) to this model's state_dict keys.
    convert_checkpoint: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None
    paper: str = ""

    def is_head(self, key: str) -> bool:
        """Whether a parameter/state-dict key belongs to a :attr:`head` module."""
        return any(key == module or key.startswith(module + ".") for module in self.head)


_REGISTRY: dict[str, SlideModelSpec] = {}


def register_slide_model(name: str, *, description: str, head: tuple[str, ...], defaults: dict[str, Any] | None = None,
                         tiny: dict[str, Any] | None = None, convert_checkpoint=None, paper: str = ""):
    """Decorator registering a builder ``fn(*, in_dim, num_outputs, **kwargs) -> SlideModel``.

    ``head`` names the modules (as in ``named_modules``) whose parameters depend on
    the outputs: absent with ``num_outputs=0``, shaped or indexed by the classes.
    """

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"slide model {name!r} registered twice")
        _REGISTRY[name] = SlideModelSpec(name, builder, description, tuple(head), dict(defaults or {}),
                                         dict(tiny or {}), convert_checkpoint, paper)
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
        Fine-tune: the checkpoint's head (the spec's ``head`` modules; none in an
        encoder-only checkpoint such as the published Prov-GigaPath slide encoder,
        another class count in a trained one) is dropped and this model's head keeps
        its fresh initialisation; every other key must still match exactly.
    """
    spec = get_slide_model_spec(name)
    kwargs = {**spec.defaults, **(spec.tiny if tiny else {}), **arch}
    model = spec.builder(in_dim=in_dim, num_outputs=num_outputs, **kwargs)
    if weights is not None:
        load_slide_weights(model, weights, spec, new_head=new_head)
    return model


def load_slide_weights(model: SlideModel, weights: str | Path, spec: SlideModelSpec, *,
                       new_head: bool = False) -> None:
    """Load a checkpoint into ``model`` strictly; with ``new_head`` the head keys
    (``spec.head``) are dropped from the checkpoint and keep the model's initialisation."""
    path = Path(weights)
    checkpoint = read_checkpoint(path, kind=("trained", "weights"))
    if checkpoint_kind(checkpoint) == "trained":
        if checkpoint["histoscope_model"] != spec.name:
            raise SlideWeightsError(f"{path} holds a trained {checkpoint['histoscope_model']!r} model, not "
                                    f"{spec.name!r}: load it as {checkpoint['histoscope_model']!r}")
        state = checkpoint["state_dict"]
    elif spec.convert_checkpoint is not None:
        state = spec.convert_checkpoint(checkpoint)
    else:
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint)) if isinstance(checkpoint, dict) else checkpoint
    if new_head:
        state = {key: value for key, value in state.items() if not spec.is_head(key)}
    missing, unexpected, mismatched = compare_state_dict(model, state)
    if new_head:
        missing = [key for key in missing if not spec.is_head(key)]
    if missing or unexpected or mismatched:
        raise SlideWeightsError(_mismatch_message(path, model, spec, missing, unexpected, mismatched, new_head))
    model.load_state_dict(state, strict=not new_head)


def _mismatch_message(path, model, spec, missing, unexpected, mismatched, new_head) -> str:
    shapes = [f"{key} (checkpoint {a}, model {b})" for key, a, b in mismatched]
    parts = [f"{len(items)} {what} {items[:8]}" for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    message = (f"{path} does not fit {type(model).__name__} ({spec.name}): {', '.join(parts)}. "
               "Is it a checkpoint of this model with these architecture settings?")
    only_head = all(spec.is_head(key) for key in [*missing, *unexpected, *(k for k, _, _ in mismatched)])
    if only_head and not new_head:
        message += (f" Only the task head ({', '.join(spec.head)}) differs: to keep the rest and train a "
                    f"new head for num_outputs={model.num_outputs}, pass new_head=True (recipe: new_head: true).")
    return message
