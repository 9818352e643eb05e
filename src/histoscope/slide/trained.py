"""Trained slide models as ``histoscope train`` writes them (``fold_k/checkpoint.pt``) and
``histoscope predict`` reads them.

A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts), so it
loads with :func:`~histoscope.io.checkpoint.read_checkpoint` and through the slide-model registry:
``load_slide_model(name, in_dim=…, num_outputs=…, weights=path, **arch)`` finds
``state_dict`` under the ``histoscope_model`` marker. Beside the weights it stores the
model's name and architecture, its input dim and what its outputs mean
(:mod:`histoscope.slide.outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histoscope.io.atomic import atomic_path
from histoscope.io.checkpoint import read_checkpoint
from histoscope.slide.base import SlideModel
from histoscope.slide.outputs import Outputs, outputs_from_meta
from histoscope.slide.registry import load_slide_model

__all__ = ["TrainedModel", "load_trained_model", "save_trained_model"]


@dataclass
class TrainedModel:
    model: SlideModel
    outputs: Outputs  # what the model's outputs mean: its prediction columns
    meta: dict[str, Any]  # everything in the checkpoint but the weights


def save_trained_model(path: str | Path, *, model: SlideModel, model_name: str, arch: dict[str, Any], in_dim: int,
                       outputs: Outputs, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with everything :func:`load_trained_model` needs, atomically."""
    checkpoint = {
        "histoscope_model": model_name,
        "arch": dict(arch),
        "in_dim": int(in_dim),
        "num_outputs": int(outputs.num_outputs),
        **outputs.meta(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_trained_model(path: str | Path, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a model written by ``histoscope train`` (strict weight loading), in eval mode."""
    checkpoint = read_checkpoint(path, kind="trained")
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = load_slide_model(meta["histoscope_model"], in_dim=meta["in_dim"], num_outputs=meta["num_outputs"],
                             weights=path, **meta["arch"])
    return TrainedModel(model.to(device).eval(), outputs_from_meta(meta), meta)
