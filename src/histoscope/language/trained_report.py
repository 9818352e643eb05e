"""Report models as ``histoscope train-report`` writes them and ``histoscope report`` reads them.

A run folder holds everything generation needs::

    RUN/model.pt      {"histoscope_model": name, "lm_config", "resampler_config", "prompt",
                       "state_dict", …}: plain data, read by io/checkpoint.py
    RUN/tokenizer/    the Hugging Face tokenizer the model was trained with

:func:`load_report_run` also takes a checkpoint file: a ``model.pt`` (its tokenizer from the
``tokenizer/`` folder beside it, or the one given) or the authors' published weights
(``histogpt-1b-6k-pruned.pth``; the tokenizer must then be given: BioGPT's, from a
local folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscope.io.atomic import atomic_path
from histoscope.io.checkpoint import checkpoint_kind, read_checkpoint
from histoscope.language.registry import get_report_model_spec, load_report_model, load_state_strict
from histoscope.language.report_text import DEFAULT_PROMPT, load_report_tokenizer

__all__ = ["ReportRun", "load_report_run", "report_model_path", "report_tokenizer_path", "save_report_model"]


def report_model_path(run_dir: str | Path) -> Path:
    """``RUN/model.pt``: the trained report model."""
    return Path(run_dir) / "model.pt"


def report_tokenizer_path(run_dir: str | Path) -> Path:
    """``RUN/tokenizer``: the tokenizer the model was trained with."""
    return Path(run_dir) / "tokenizer"


@dataclass
class ReportRun:
    model: nn.Module  # in eval mode
    tokenizer: Any  # a Hugging Face tokenizer
    prompt: str
    meta: dict[str, Any]  # everything in the checkpoint but the weights


def save_report_model(path: str | Path, *, model: nn.Module, name: str, lm_config: dict[str, Any],
                      resampler_config: dict[str, Any], prompt: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with what :func:`load_report_run` needs to rebuild it, atomically."""
    checkpoint = {"histoscope_model": name, "lm_config": dict(lm_config), "resampler_config": dict(resampler_config),
                  "prompt": prompt, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                  **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_report_run(source: str | Path, *, tokenizer: str | Path | None = None, name: str = "histogpt",
                    device: str | torch.device = "cpu") -> ReportRun:
    """A trained report model and its tokenizer from a run folder or a checkpoint file.

    Parameters
    ----------
    source : path
        A ``train-report`` folder, its ``model.pt``, or published weights.
    tokenizer : path, optional
        A tokenizer folder, replacing the run's (required for published weights).
    name : str
        Registry name for published weights (``histogpt``, ``histogpt_3b``).
    """
    source = Path(source)
    path = report_model_path(source) if source.is_dir() else source
    if source.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{source}: no model.pt here; pass a histoscope train-report folder or a checkpoint")
    checkpoint = read_checkpoint(path, kind=("trained", "weights"))
    if checkpoint_kind(checkpoint) == "trained":
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        # the sizes are recorded, head counts included: build from them, then load strictly
        spec = get_report_model_spec(meta["histoscope_model"])
        model = spec.builder(lm_config=meta["lm_config"], resampler_config=meta["resampler_config"])
        load_state_strict(model, checkpoint["state_dict"], path=path, spec=spec)
        prompt = meta.get("prompt", DEFAULT_PROMPT)
    else:
        meta = {"histoscope_model": name, "weights": str(path)}
        model = load_report_model(name, weights=path)
        prompt = DEFAULT_PROMPT
    del checkpoint
    folder = Path(tokenizer) if tokenizer is not None else report_tokenizer_path(path.parent)
    if tokenizer is None and not folder.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer/ folder beside it; pass --tokenizer with the tokenizer the "
                                "model was trained with (BioGPT's for published HistoGPT weights)")
    tok = load_report_tokenizer(folder)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tok)} tokens but the model {model.config.vocab_size}; "
                         "pass the tokenizer the model was trained with")
    return ReportRun(model.to(device).eval(), tok, prompt, meta)
