"""The report-model registry and its one loader.

An entry is a builder ``(*, lm_config: dict, resampler_config: dict, **arch) -> model``
plus a frozen :class:`ReportModelSpec`: the published configs, where the weights live,
how the authors' checkpoint keys map to ours and how its sizes are read off it.

``load_report_model(name, weights=..., lm_config=..., resampler_config=..., **arch)``
takes the spec's configs, replaces the sizes a checkpoint reveals, applies the
caller's configs on top, builds, and loads the checkpoint strictly: a missing,
unexpected or misshapen key is an error naming the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from histoscope.io.checkpoint import checkpoint_kind, compare_state_dict, read_checkpoint

if TYPE_CHECKING:  # listing the registry imports neither torch nor transformers
    from torch import Tensor, nn

__all__ = ["ReportModelSpec", "ReportWeightsError", "get_report_model_spec", "list_report_models",
           "load_report_model", "read_report_weights", "register_report_model"]

_SHOWN = 8  # keys listed per category in a mismatch report


class ReportWeightsError(RuntimeError):
    """A report-model checkpoint cannot be read or does not fit the model built for it."""


@dataclass(frozen=True)
class ReportModelSpec:
    """One published report model: builder plus data.

    ``lm_config`` holds ``transformers.BioGptConfig`` fields, ``resampler_config`` the
    reference's resampler fields (``dim_feats, dim_model, dim_head, num_heads,
    num_layers, num_latents``). ``convert_checkpoint`` maps the authors' state-dict
    keys to ours (a checkpoint already in our layout passes through);
    ``infer_config(state, lm_config, resampler_config) -> (lm_config, resampler_config)``
    reads the sizes a (converted) checkpoint reveals, given the configs so far;
    ``checkpoint_key`` names one of our keys as the authors do, for error messages.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    lm_config: Mapping[str, Any] = field(default_factory=dict)
    resampler_config: Mapping[str, Any] = field(default_factory=dict)
    # (lm_config, resampler_config) overrides giving a CPU-test-sized variant of the same builder
    tiny: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {})
    convert_checkpoint: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    infer_config: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None
    checkpoint_key: Callable[[str], str] | None = None
    tie_keys: tuple[tuple[str, str], ...] = ()  # (copy, source): a checkpoint may leave out a tied copy
    hf_repo: str | None = None
    hf_filename: str | None = None
    tokenizer: str | None = None  # Hugging Face name of the tokenizer the model was trained with
    license: str = "unknown"
    paper: str = ""


_REGISTRY: dict[str, ReportModelSpec] = {}


def register_report_model(name: str, *, description: str, lm_config: Mapping[str, Any] | None = None,
                          resampler_config: Mapping[str, Any] | None = None, **spec_fields: Any):
    """Decorator registering a builder ``fn(*, lm_config, resampler_config, **arch)``;
    ``spec_fields`` are the other :class:`ReportModelSpec` fields."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"report model {name!r} registered twice")
        _REGISTRY[name] = ReportModelSpec(name, builder, description, dict(lm_config or {}),
                                          dict(resampler_config or {}), **spec_fields)
        return builder

    return wrap


def _ensure_registered() -> None:
    import histoscope.language.builders  # noqa: F401  (registers the built-in models)


def list_report_models() -> list[str]:
    _ensure_registered()
    return sorted(_REGISTRY)


def get_report_model_spec(name: str) -> ReportModelSpec:
    _ensure_registered()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown report model {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def load_report_model(name: str, *, weights: str | Path | None = None, lm_config: Mapping[str, Any] | None = None,
                      resampler_config: Mapping[str, Any] | None = None, tiny: bool = False,
                      **arch: Any) -> nn.Module:
    """Build a registered report model; with ``weights``, load a checkpoint strictly.

    Parameters
    ----------
    name : str
        Registry name (:func:`list_report_models`).
    weights : path, optional
        A checkpoint in the authors' key layout (e.g. ``histogpt-1b-6k-pruned.pth``),
        ours (``model.state_dict()``) or one ``histoscope train`` wrote;
        ``.pth``/``.pt``/``.bin`` or ``.safetensors`` (read by
        :func:`histoscope.io.checkpoint.read_checkpoint`).
        None builds a randomly initialised model (for training).
    lm_config : dict, optional
        ``BioGptConfig`` fields overriding the spec's and the checkpoint's sizes
        (the head count cannot be read off a checkpoint: give ``num_attention_heads``
        when it is not the spec's or width / 64).
    resampler_config : dict, optional
        Resampler fields (``dim_feats, dim_model, dim_head, num_heads, num_layers,
        num_latents``) overriding the same.
    tiny : bool
        Build the spec's CPU-test-sized variant (its ``tiny`` configs on top of the
        published ones), as the contract tests do for every registered model.
    **arch
        Other builder keywords (e.g. ``ff_mult``).
    """
    spec = get_report_model_spec(name)
    lm, resampler = dict(spec.lm_config), dict(spec.resampler_config)
    if tiny:
        lm.update(spec.tiny[0])
        resampler.update(spec.tiny[1])
    state = path = None
    if weights is not None:
        path = Path(weights)
        state = read_report_weights(path, spec)
        if spec.infer_config is not None:
            try:
                inferred_lm, inferred_resampler = spec.infer_config(state, lm, resampler)
            except (KeyError, ValueError) as error:
                raise ReportWeightsError(f"{path}: cannot read the model sizes off this checkpoint ({error}); "
                                         f"is it a {name} checkpoint?") from error
            lm.update(inferred_lm)
            resampler.update(inferred_resampler)
    lm.update(lm_config or {})
    resampler.update(resampler_config or {})
    model = spec.builder(lm_config=lm, resampler_config=resampler, **arch)
    if state is not None:
        load_state_strict(model, state, path=path, spec=spec)
    return model


def read_report_weights(path: Path, spec: ReportModelSpec) -> dict[str, Tensor]:
    """The state dict in ``path``: published weights (converted to our keys by the spec)
    or a model ``histoscope train`` wrote; unreadable files raise
    :class:`~histoscope.io.checkpoint.CheckpointError` naming the file."""
    checkpoint = read_checkpoint(path, kind=("trained", "weights"))
    if checkpoint_kind(checkpoint) == "trained":
        if checkpoint["histoscope_model"] != spec.name:
            raise ReportWeightsError(f"{path} holds a trained {checkpoint['histoscope_model']!r} model, not "
                                     f"{spec.name!r}: load it as {checkpoint['histoscope_model']!r}")
        return checkpoint["state_dict"]
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    import torch

    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ReportWeightsError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return spec.convert_checkpoint(checkpoint) if spec.convert_checkpoint is not None else checkpoint


def load_state_strict(model: nn.Module, state: dict[str, Tensor], *, path: Path | None,
                      spec: ReportModelSpec | None = None) -> None:
    """Load ``state`` into ``model`` only if every key and shape matches (a tied copy
    named in ``spec.tie_keys`` may be left out); else :class:`ReportWeightsError`."""
    import torch

    where = str(path) if path is not None else "state dict"
    label = f"{type(model).__name__}" + (f" ({spec.name})" if spec else "")
    expected = model.state_dict()
    state = dict(state)
    name_of = spec.checkpoint_key if spec is not None and spec.checkpoint_key is not None else str
    for copy, source in (spec.tie_keys if spec else ()):
        if copy in expected and expected[copy].data_ptr() == expected[source].data_ptr():
            if copy not in state and source in state:
                state[copy] = state[source]
            elif copy in state and source in state and not torch.equal(state[copy], state[source]):
                raise ReportWeightsError(
                    f"{where}: {name_of(copy)} differs from {name_of(source)}, but {label} ties them; for a "
                    "checkpoint trained with an untied output projection pass "
                    "lm_config={'tie_word_embeddings': False}")
    missing, unexpected, mismatched = compare_state_dict(model, state)
    missing, unexpected = [name_of(k) for k in missing], [name_of(k) for k in unexpected]
    misshapen = [f"{name_of(k)} (checkpoint {a}, model {b})" for k, a, b in mismatched]
    if missing or unexpected or misshapen:
        lines = [f"{where}: does not fit {label}:"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if keys:
                more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                lines.append(f"  {len(keys)} {what} keys: {', '.join(keys[:_SHOWN])}{more}")
        lines.append("Is it a checkpoint of this model? Sizes are read off the checkpoint; pass lm_config / "
                     "resampler_config for what cannot be (head counts), and nothing that contradicts it.")
        raise ReportWeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)
