"""Training recipes: YAML files plus ``key=value`` overrides, checked against :class:`TrainConfig`.

Overrides use dotted keys for nested sections (``survival.loss=discrete``,
``model_args.dropout=0.25``) and their values are parsed as YAML scalars
(``epochs=20``, ``tiny=true``, ``max_tiles=null``). Any key the config does not
have is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.utils.recipe import ConfigError, apply_overrides, build_config, read_recipe, record_recipe

__all__ = ["TrainConfig", "SurvivalConfig", "ConfigError", "load_recipe", "apply_overrides", "build_config",
           "read_recipe", "record_recipe"]

TASKS = ("classification", "regression", "survival")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SurvivalConfig:
    loss: str = "cox"  # cox (partial likelihood, Breslow ties) | discrete (NLL over time bins)
    bins: int = 4  # discrete: intervals cut at quantiles of the training event times


@dataclass
class TrainConfig:
    """Everything a ``histoscope train`` run depends on; saved as ``OUT/config.yaml``."""

    task: str = "classification"
    csv: str = ""  # slide_id, label | time + event, optional patient_id, fold or split
    features_dir: str = ""  # folder of <slide_id>.h5 features files (OUT/features_<encoder>)
    out_dir: str = "runs/slide"
    label_column: str = "label"
    model: str = "abmil_gated"
    model_args: dict = field(default_factory=dict)
    tiny: bool = False
    init_weights: str | None = None  # start from this checkpoint (published weights or a histoscope train one)
    new_head: bool = False  # drop the checkpoint's head: another class count, or an encoder-only checkpoint
    freeze_encoder: bool = False  # train the head only (the model's declared head modules)
    layer_decay: float | None = None  # layer-wise lr decay: lr · layer_decay^(depth of the top − depth)
    folds: int = 5
    final: bool = False  # after cross-validation, one model on every slide → OUT/final/checkpoint.pt
    val_fraction: float = 0.2  # of each fold's training patients, for early stopping
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    batch_size: int = 1  # bags per forward pass, padded to the longest
    accumulate: int = 1  # forward passes per optimizer step
    grad_clip: float | None = None
    max_tiles: int | None = None  # random subset of tiles per training bag
    patience: int = 5  # epochs without validation improvement before stopping
    monitor: str = "loss"  # validation loss, or a metric name (auroc, c_index, r2, …)
    class_weighting: bool = True
    balanced_sampling: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on AMX CPUs and recent GPUs, else fp32
    cache_gb: float = 4.0  # in-memory features cache (LRU by bytes)
    bootstrap: int = 1000  # resamples for the 95% CIs
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)

    def validate(self) -> TrainConfig:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.csv:
            problems.append("csv is required")
        if not self.features_dir:
            problems.append("features_dir is required")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.survival.loss not in ("cox", "discrete"):
            problems.append(f"survival.loss must be cox or discrete, got {self.survival.loss!r}")
        for name in ("folds", "epochs", "batch_size", "accumulate", "survival.bins"):
            value = _get(self, name)
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_tiles is not None and self.max_tiles < 1:
            problems.append(f"max_tiles must be >= 1 or null, got {self.max_tiles}")
        if (self.new_head or self.freeze_encoder) and not self.init_weights:
            problems.append("new_head and freeze_encoder fine-tune a checkpoint: set init_weights to its path")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            problems.append(f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if self.class_weighting and self.balanced_sampling and self.task == "classification":
            problems.append("use class_weighting or balanced_sampling, not both (they would correct twice)")
        if self.task == "survival" and self.survival.loss == "cox" and self.batch_size < 2:
            problems.append("the Cox loss compares slides within a batch: set batch_size >= 2 "
                            "(8-32 typical) or use survival.loss=discrete")
        if problems:
            raise ConfigError("invalid recipe: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build_config(cls, data)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML recipe (optional: a path, or the name of a
    recipe shipped in ``histoscope/train/recipes/``) and overrides.

    Examples
    --------
    >>> cfg = load_recipe("abmil_classification", ["epochs=5", "survival.bins=6"])  # doctest: +SKIP
    """
    return TrainConfig.from_dict(read_recipe(path, overrides, package="histoscope.train")).validate()
