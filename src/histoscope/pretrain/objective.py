"""The objective interface and registry: what a self-supervised method gives the trainer.

An :class:`Objective` owns its networks (``student``: the module trained by gradient,
which the trainer wraps for DDP; anything else, such as an EMA teacher, it updates
itself), turns a batch into a dict of losses, and knows how to export what it trained.
The trainer owns everything generic: data streaming, the optimiser and its learning-
rate/weight-decay schedules, precision, DDP, checkpoints, logging and the eval hook.
A new method is a config dataclass plus a builder registered with
:func:`register_objective`; ``histoscope pretrain NAME`` finds it here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Objective", "ObjectiveSpec", "RunInfo", "get_objective", "list_objectives", "register_objective"]


@dataclass(frozen=True)
class RunInfo:
    """What an objective needs to know about the run it is built for."""

    total_iters: int  # length of the schedules (epochs x epoch_length)
    epoch_length: int  # iterations per (schedule) epoch
    global_batch: int
    device: torch.device
    seed: int


class Objective(nn.Module, abc.ABC):
    """One self-supervised method. Subclasses set ``self.student`` in ``__init__``."""

    student: nn.Module

    def __init__(self):
        super().__init__()
        self._student_call: Callable | None = None

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route student calls through ``wrap(self.student)`` (DDP) without re-registering it."""
        object.__setattr__(self, "_student_call", wrap(self.student))

    def run_student(self, *args, **kwargs):
        """Call the student (through its DDP wrapper when distributed): use this in ``forward``."""
        return (self._student_call or self.student)(*args, **kwargs)

    @abc.abstractmethod
    def collate(self) -> Callable[..., dict[str, Any]]:
        """Picklable ``collate(tiles, positions=, step=, rank=, world_size=, seed=)`` run in data workers."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        """Losses of one batch (already on the device); ``"loss"`` is what is back-propagated."""

    @abc.abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimiser groups with ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``."""

    def clip_modules(self) -> list[nn.Module]:
        """Modules whose gradients are clipped separately."""
        return [self.student]

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (e.g. the EMA teacher update)."""

    def step_stats(self, step: int) -> dict[str, float]:
        """Scheduled values worth logging at ``step`` (momentum, temperature, ...)."""
        return {}

    @abc.abstractmethod
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (B, H, W, 3) on the device -> (B, D) embeddings of the model being trained,
        as the exported model will compute them (used by the eval hook)."""

    @abc.abstractmethod
    def export(self, out_dir: Path) -> Path:
        """Write the trained model where and how the next stage loads it; returns the file."""


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    description: str
    config: type  # dataclass of the objective's own recipe keys
    build: Callable[..., Objective]  # build(config, common, info) -> Objective
    validate: Callable[[Any, Any], None] | None = None  # validate(config, common), raises ConfigError
    inputs: str = "tiles"  # tiles (data.patches or data.images) or features (data.features: tile embeddings)
    # features objectives: index(config, common, log) -> the samples StepStream draws (see feature_data)
    index: Callable[..., Any] | None = None


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(*, name: str, description: str, config: type, validate=None, inputs: str = "tiles",
                       index=None):
    """Decorator registering ``build(config, common, info) -> Objective`` under ``name``."""

    def decorate(build):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        _OBJECTIVES[name] = ObjectiveSpec(name=name, description=description, config=config, build=build,
                                          validate=validate, inputs=inputs, index=index)
        return build

    return decorate


def list_objectives() -> list[str]:
    _load_builtin()
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> ObjectiveSpec:
    _load_builtin()
    if name not in _OBJECTIVES:
        raise ValueError(f"no pretraining objective named {name!r}; known: {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name]


def _load_builtin() -> None:
    from histoscope.pretrain import dinov2, hipt, mae, slide_mae  # noqa: F401  (register themselves)


def seeded_rng(*parts: int) -> np.random.Generator:
    """A numpy generator that depends only on ``parts`` (seed, step, position, ...)."""
    return np.random.default_rng([int(p) for p in parts])
