"""``histoscope pretrain`` recipes: the trainer's keys (:class:`PretrainConfig`) plus the objective's.

A recipe is one YAML mapping. Keys of :class:`PretrainConfig` (model, data, optimiser,
checkpoints, logging, evaluation) are the trainer's; all other top-level keys belong to
the objective's own config dataclass (``crops``, ``dino``, ``ibot``, ... for DINOv2).
Overrides are ``dotted.key=value``; an unknown key is an error listing the valid ones.
Optimiser names follow DINOv2's ``ssl_default_config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.utils.recipe import ConfigError, build_config, read_recipe, valid_keys

__all__ = ["DataConfig", "EvalConfig", "OptimConfig", "PretrainConfig", "Recipe", "load_pretrain_recipe"]

PRECISIONS = ("auto", "fp32", "bf16")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


@dataclass
class DataConfig:
    patches: list[str] = field(default_factory=list)  # tile OUT folders, patches/ folders or *_patches.h5
    slide_dir: str | None = None  # where to find slides whose recorded path moved
    images: str | None = None  # an image folder instead of slides
    features: list[str] = field(default_factory=list)  # features folders or .h5 files (slide-level objectives)
    workers: int = 4  # data-loader processes per rank
    chunk: int = 64  # consecutive tiles of one slide read together
    buffer: int = 4096  # shuffle-buffer size (samples)


@dataclass
class OptimConfig:
    epochs: int = 100
    epoch_length: int = 1250  # iterations per epoch (DINOv2's OFFICIAL_EPOCH_LENGTH)
    batch_size: int = 1024  # global: split over the processes
    base_lr: float = 0.004  # for a batch of 1024 under sqrt_wrt_1024
    scaling_rule: str = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float | None = 3.0
    freeze_last_layer_epochs: int = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def lr(self) -> float:
        """``base_lr`` scaled to ``batch_size`` by ``scaling_rule``."""
        if self.scaling_rule == "sqrt_wrt_1024":
            return self.base_lr * (self.batch_size / 1024.0) ** 0.5
        if self.scaling_rule == "linear_wrt_256":
            return self.base_lr * self.batch_size / 256.0
        return self.base_lr


@dataclass
class EvalConfig:
    every: int = 0  # iterations between kNN (and linear) probes; 0: never
    images: str | None = None  # labelled tiles: ROOT/<class>/*.png or ROOT/{train,test}/<class>/*.png
    k: int = 20
    linear: bool = False
    test_fraction: float = 0.3  # held out per class when the folder has no train/test split
    batch_size: int = 64


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    encoder: str = "timm:vit_small_patch16_224"  # any ViT of the tile-encoder registry (a slide model for slide_mae)
    weights: str = "random"  # random, a checkpoint file (continued pretraining) or null (the Hub)
    arch: dict = field(default_factory=dict)  # architecture overrides (tiny variants)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the hardware computes it natively
    max_steps: int | None = None  # stop before the schedule ends (the schedule is unchanged)
    log_every: int = 10
    checkpoint_every: int = 500
    tensorboard: bool = True  # if the tensorboard package is installed
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def total_iters(self) -> int:
        return self.optim.epochs * self.optim.epoch_length

    @property
    def stop_step(self) -> int:
        return min(self.total_iters, self.max_steps) if self.max_steps is not None else self.total_iters

    def validate(self, inputs: str = "tiles") -> None:
        problems = []
        if inputs == "features":
            if not self.data.features or self.data.patches or self.data.images:
                problems.append("this objective trains on tile embeddings: give data.features (features folders "
                                "or .h5 files written by `histoscope embed`), not data.patches or data.images")
        elif bool(self.data.patches) == bool(self.data.images) or self.data.features:
            problems.append("give data.patches (tile OUT folders or patches files) or data.images, not both "
                            "(data.features is for slide-level objectives)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optim.scaling_rule not in SCALING_RULES:
            problems.append(f"optim.scaling_rule must be one of {SCALING_RULES}")
        for name in ("optim.epochs", "optim.epoch_length", "optim.batch_size", "log_every", "checkpoint_every",
                     "data.chunk", "data.buffer"):
            section, _, key = name.rpartition(".")
            value = getattr(getattr(self, section) if section else self, key)
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.optim.warmup_epochs > self.optim.epochs:
            problems.append("optim.warmup_epochs exceeds optim.epochs")
        if self.eval.every and inputs == "features":
            problems.append("eval.every probes tile encoders on labelled tiles; slide-level objectives have no "
                            "eval hook (set eval.every=0)")
        elif self.eval.every and not self.eval.images:
            problems.append("eval.every needs eval.images (a labelled image folder)")
        if problems:
            raise ConfigError("invalid recipe: " + "; ".join(problems))


@dataclass
class Recipe:
    """A run: the objective's name, the trainer's config and the objective's own config."""

    objective: str
    common: PretrainConfig
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, **dataclasses.asdict(self.common), **dataclasses.asdict(self.config)}


def load_pretrain_recipe(objective: str, path: str | Path | None = None, overrides: list[str] | None = None
                         ) -> Recipe:
    """A validated :class:`Recipe` for ``objective`` from a YAML file (optional) and overrides."""
    from histoscope.pretrain.objective import get_objective

    spec = get_objective(objective)
    data = read_recipe(path, overrides, package="histoscope.pretrain")
    named = data.pop("objective", objective)
    if named != objective:
        raise ConfigError(f"{path}: this recipe is for objective {named!r}, not {objective!r}")
    common_keys = {f.name for f in dataclasses.fields(PretrainConfig)}
    valid = valid_keys(PretrainConfig) + valid_keys(spec.config)
    common = build_config(PretrainConfig, {k: v for k, v in data.items() if k in common_keys}, valid=valid)
    config = build_config(spec.config, {k: v for k, v in data.items() if k not in common_keys}, valid=valid)
    common.validate(spec.inputs)
    if spec.validate is not None:
        spec.validate(config, common)
    return Recipe(objective=objective, common=common, config=config)
