"""What ``histoscope train`` stores besides the trained model: the architecture a run builds
and the resumable training state (``fold_k/train_state.pt``).

The trained model itself (``fold_k/checkpoint.pt``) is written and read by
:mod:`histoscope.slide.trained`, which ``histoscope predict`` uses too.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from histoscope.io.atomic import atomic_path
from histoscope.io.checkpoint import read_checkpoint
from histoscope.slide import get_slide_model_spec

__all__ = ["resolved_arch", "save_state", "load_state"]


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


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Training state (model, optimizer, scheduler, RNG, epoch, early stopping), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    return read_checkpoint(path, kind="train_state")
