"""``histoscope train-report`` recipes: YAML plus ``key=value`` overrides, checked against :class:`ReportConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.train.config import PRECISIONS, ConfigError, build_config, read_recipe

__all__ = ["ReportConfig", "Stage1Config", "load_report_recipe"]

_ALIASES = {"csv": "reports", "out": "out_dir"}  # the spelling of two keys


@dataclass
class Stage1Config:
    """Stage 1: the resampler as a MIL classifier of ``label`` (``histoscope train``'s trainer)."""

    enabled: bool = True  # runs when the table has labels
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-2
    batch_size: int = 1
    patience: int = 5
    max_tiles: int | None = None
    bootstrap: int = 200  # resamples for the CIs of its results.md


@dataclass
class ReportConfig:
    """Everything a ``train-report`` run depends on; saved as ``OUT/config.yaml``."""

    reports: str = ""  # CSV: slide_id, report (a row per paraphrase), optional label, patient_id, split, fold
    features_dir: str = ""  # folder of <slide_id>.h5 features files (OUT/features_<encoder>)
    out_dir: str = "runs/report"
    model: str = "histogpt"  # a registered report model
    tiny: bool = False  # its CPU-test-sized configs
    lm_config: dict = field(default_factory=dict)  # BioGptConfig fields over the model's
    resampler_config: dict = field(default_factory=dict)  # dim_feats, dim_model, dim_head, num_heads, num_layers, num_latents
    weights: str | None = None  # a HistoGPT checkpoint to start from (published, or a run's model.pt)
    lm_path: str | None = None  # a local BioGPT folder (config.json + weights) for the language model
    tokenizer: str | None = None  # tokenizer folder; null: lm_path's, else a BPE trained on the training reports
    vocab_size: int = 1000  # of that BPE
    prompt: str = "Final diagnosis:"
    label_column: str = "label"
    stage1: Stage1Config = field(default_factory=Stage1Config)
    train_resampler: bool | None = None  # null: frozen after stage 1, trained when there was none
    train_lm: bool = False  # the decoder's own layers and embeddings (HistoGPT: frozen)
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    batch_size: int = 8  # slides per step
    grad_clip: float | None = 1.0
    max_tiles: int | None = None  # random subset of tiles per training slide
    max_report_tokens: int = 256  # longer reports are cut (the end token kept)
    patience: int | None = None  # epochs without a lower validation loss before stopping (null: never)
    val_fraction: float = 0.1  # of the patients without a split value
    test_fraction: float = 0.2
    test_fold: str | None = None  # with a fold column: the fold held out (default: the first)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on AMX CPUs and recent GPUs, else fp32
    cache_gb: float = 4.0  # in-memory features cache

    def validate(self) -> ReportConfig:
        problems = []
        if not self.reports:
            problems.append("reports is required (a CSV of slide_id, report)")
        if not self.features_dir:
            problems.append("features_dir is required (the folder of <slide_id>.h5 features files)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("epochs", "batch_size", "max_report_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            problems.append("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience must be >= 1 or null, got {self.patience}")
        if self.weights and self.lm_path:
            problems.append("give weights (a whole HistoGPT) or lm_path (its language model), not both")
        if not self.prompt.strip():
            problems.append("prompt must not be empty")
        if problems:
            raise ConfigError("invalid recipe: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_report_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> ReportConfig:
    """A validated :class:`ReportConfig` from a YAML recipe (optional) and ``key=value`` overrides
    (``csv=`` and ``out=`` are accepted for ``reports=`` and ``out_dir=``).

    Examples
    --------
    >>> config = load_report_recipe("histogpt_tiny", ["reports=reports.csv", "features_dir=feats"])  # doctest: +SKIP
    """
    data = read_recipe(path, overrides, package="histoscope.train.report")
    for alias, key in _ALIASES.items():
        if alias in data:
            if key in data and overrides and any(o.startswith(f"{key}=") for o in overrides):
                raise ConfigError(f"{alias} and {key} name the same setting; give one")
            data[key] = data.pop(alias)
    return build_config(ReportConfig, data).validate()
