"""Trained-model checkpoints (``fold_k/checkpoint.pt``) and resumable training state.

A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts), so it
loads with :func:`~histoscope.io.checkpoint.read_checkpoint` and through the slide-model registry:
``load_slide_model(name, in_dim=…, num_outputs=…, weights=path, **arch)`` finds
``state_dict`` under the ``histoscope_model`` marker.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histoscope.io.atomic import atomic_path
from histoscope.io.checkpoint import read_checkpoint
from histoscope.slide import SlideModel, get_slide_model_spec, load_slide_model
from histoscope.train.tasks import Task, task_from_meta

__all__ = ["save_checkpoint", "load_trained_model", "TrainedModel", "resolved_arch", "save_state", "load_state"]


def resolved_arch(name: str, *, tiny: bool, model_args: dict[str, Any]) -> dict[str, Any]:
    """The builder keywords a model was built with, so later registry default changes
    cannot silently change what a checkpoint loads into."""
    spec = get_slide_model_spec(name)
    parameters = inspect.signature(spec.builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        valid = sorted(set(parameters) - {"in_dim", "num_outputs"})
        unknown = sorted(set(model_args) - set(valid))
        if unknown:
            raise ValueError(f"model_args {unknown} are not arguments of slide model {name!r}; "
                             f"it takes {', '.join(valid) or 'none'}")
    return {**spec.defaults, **(spec.tiny if tiny else {}), **model_args}


def save_checkpoint(path: str | Path, *, model: SlideModel, model_name: str, arch: dict[str, Any], in_dim: int,
                    task: Task, extra: dict[str, Any] | None = None) -> Path:
    checkpoint = {
        "histoscope_model": model_name,
        "arch": dict(arch),
        "in_dim": int(in_dim),
        "num_outputs": int(task.num_outputs),
        **task.meta(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


@dataclass
class TrainedModel:
    model: SlideModel
    task: Task
    meta: dict[str, Any]  # everything in the checkpoint but the weights


def load_trained_model(path: str | Path, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a model written by ``histoscope train`` (strict weight loading), in eval mode."""
    checkpoint = read_checkpoint(path, kind="trained")
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = load_slide_model(meta["histoscope_model"], in_dim=meta["in_dim"], num_outputs=meta["num_outputs"],
                             weights=path, **meta["arch"])
    return TrainedModel(model.to(device).eval(), task_from_meta(meta), meta)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Training state (model, optimizer, scheduler, RNG, epoch, early stopping), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    return read_checkpoint(path, kind="train_state")
