"""The image–text (alignment) model registry and its loader.

An entry is a builder ``(**arch) -> AlignModel`` plus a frozen :class:`AlignModelSpec`:
the published architecture as builder keywords, a tiny CPU-test variant, where the
weights come from. ``load_align_model(name, weights=..., **arch)`` builds and loads a
checkpoint strictly -- the published key layout is the model's own (CONCH's
``pytorch_model.bin`` loads unchanged), and so is a ``histoscope train-align`` model.

Builders are registered on first use (:mod:`histoscope.language.align.builders`); the
registry and those entries import no torch, so listing models is instant.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscope.io.checkpoint import CheckpointError, compare_state_dict, read_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["AlignModelSpec", "AlignWeightsError", "builder_parameters", "get_align_model_spec", "list_align_models",
           "load_align_model", "load_align_state", "register_align_model", "resolved_arch"]

_SHOWN = 8  # keys listed per category in a mismatch report


class AlignWeightsError(ValueError):
    """An image–text checkpoint cannot be read or does not fit the model built for it."""


@dataclass(frozen=True)
class AlignModelSpec:
    """One registered image–text model: ``builder(**{**defaults, **tiny?, **arch})``."""

    name: str
    description: str
    builder: Callable[..., Any]  # (**arch) -> AlignModel
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the published architecture
    tiny: Mapping[str, Any] = field(default_factory=dict)  # overrides for a CPU-test-sized variant
    hf_repo: str | None = None  # where the published weights are (download them yourself: weights=PATH)
    hf_filename: str | None = None
    gated: bool = False
    license: str = "unknown"
    homepage: str = ""


_REGISTRY: dict[str, AlignModelSpec] = {}


def register_align_model(name: str, *, description: str, **spec_fields: Any):
    """Decorator registering ``builder(**arch) -> AlignModel`` under ``name``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"image–text model {name!r} registered twice")
        _REGISTRY[name] = AlignModelSpec(name=name, description=description, builder=builder, **spec_fields)
        return builder

    return wrap


def _ensure_registered() -> None:
    import histoscope.language.align.builders  # noqa: F401  (registers the built-in models)


def list_align_models() -> list[str]:
    _ensure_registered()
    return sorted(_REGISTRY)


def get_align_model_spec(name: str) -> AlignModelSpec:
    _ensure_registered()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise KeyError(f"no image–text model named {name!r}{hint}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def builder_parameters(name: str) -> list[str]:
    """The keywords the builder of ``name`` takes (imports the model's module)."""
    builder = get_align_model_spec(name).builder
    builder = builder.resolve() if hasattr(builder, "resolve") else builder
    return list(inspect.signature(builder).parameters)


def resolved_arch(name: str, *, tiny: bool = False, **arch: Any) -> dict[str, Any]:
    """The builder keywords a model is built with: published defaults, tiny overrides, ``arch``."""
    spec = get_align_model_spec(name)
    valid = builder_parameters(name)
    unknown = sorted(set(arch) - set(valid))
    if unknown:
        close = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
        raise ValueError(f"{', '.join(repr(u) + (f' (did you mean {c[0]!r}?)' if c else '') for u, c in close.items())}"
                         f" not arguments of image–text model {name!r}; it takes {', '.join(valid)}")
    return {**spec.defaults, **(spec.tiny if tiny else {}), **arch}


def load_align_model(name: str, *, weights: str | Path | None = None, tiny: bool = False, **arch: Any):
    """Build a registered image–text model; with ``weights``, load them strictly.

    Parameters
    ----------
    name : str
        Registry name (:func:`list_align_models`), e.g. ``"conch"``.
    weights : path, optional
        A state dict in the model's key layout -- the published checkpoint (CONCH's
        ``pytorch_model.bin``) or a ``histoscope train-align`` ``model.pt``. None
        builds randomly initialised weights (for training).
    tiny : bool
        The spec's CPU-test-sized variant.
    **arch
        Builder keywords overriding the published architecture.
    """
    spec = get_align_model_spec(name)
    model = spec.builder(**resolved_arch(name, tiny=tiny, **arch))
    if weights is not None:
        load_align_state(model, read_align_state(weights), path=weights, name=name)
    return model


def read_align_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (bare, or under ``state_dict`` as histoscope writes it)."""
    import torch

    try:
        obj = read_checkpoint(path, kind=("weights", "align"))
    except CheckpointError as error:
        raise AlignWeightsError(str(error)) from error
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AlignWeightsError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_align_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, path: str | Path | None = None,
                     name: str | None = None) -> None:
    """Load ``state`` into ``model`` only if every key and shape matches; else :class:`AlignWeightsError`."""
    missing, unexpected, mismatched = compare_state_dict(model, state)
    if missing or unexpected or mismatched:
        label = f"image–text model {name!r}" if name else type(model).__name__
        lines = [f"{path or 'state dict'}: does not fit {label}:"]
        shapes = [f"{k} (checkpoint {a}, model {b})" for k, a, b in mismatched]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", shapes)):
            if keys:
                more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                lines.append(f"  {len(keys)} {what} keys: {', '.join(keys[:_SHOWN])}{more}")
        lines.append("Is it a checkpoint of this model, built with the same architecture (model_args)?")
        raise AlignWeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)
