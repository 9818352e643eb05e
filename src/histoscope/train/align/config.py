"""``histoscope train-align`` recipes: YAML plus ``key=value`` overrides, checked against :class:`AlignConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.train.config import PRECISIONS, ConfigError, build_config, read_recipe

__all__ = ["AlignConfig", "load_align_recipe"]


@dataclass
class AlignConfig:
    """Everything a ``train-align`` run depends on; saved as ``OUT/config.yaml``."""

    pairs: str = ""  # CSV: image | features, caption, optional split (train/val/test) and label
    out_dir: str = "runs/align"
    model: str = "clip"  # a registered image–text model (histoscope models --kind align)
    model_args: dict = field(default_factory=dict)  # its builder keywords: towers and sizes
    tiny: bool = False
    weights: str | None = None  # initial weights: a published checkpoint (CONCH's pytorch_model.bin) or a model.pt
    tokenizer: str | None = None  # tokenizer file or folder; null: the Hugging Face text model's, else a BPE trained here
    vocab_size: int = 8000  # of the BPE tokenizer trained on the training captions
    clip_weight: float = 1.0  # symmetric InfoNCE
    caption_weight: float = 0.0  # CoCa's captioning loss (needs a decoder: model_args.decoder_layers > 0)
    epochs: int = 10  # 0: write the initial model (e.g. published weights) for zero-shot evaluation
    lr: float = 5e-4
    weight_decay: float = 0.2  # not on biases, norms and the temperature (open_clip)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    batch_size: int = 64  # pairs per step: each pair's negatives are the batch's other pairs
    grad_clip: float | None = None
    patience: int | None = None  # epochs without a lower validation loss before stopping (null: never)
    val_fraction: float = 0.1  # of the rows without a split value
    test_fraction: float = 0.1  # of the rows without a split value
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on AMX CPUs and recent GPUs, else fp32

    def validate(self) -> AlignConfig:
        problems = []
        if not self.pairs:
            problems.append("pairs is required (a CSV of image or features paths and captions)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.epochs < 0 or self.batch_size < 2:
            problems.append(f"epochs must be >= 0 and batch_size >= 2 (InfoNCE needs negatives), got "
                            f"{self.epochs} and {self.batch_size}")
        if self.clip_weight < 0 or self.caption_weight < 0 or self.clip_weight + self.caption_weight == 0:
            problems.append("clip_weight and caption_weight must be >= 0 and not both 0")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            problems.append("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience must be >= 1 or null, got {self.patience}")
        if self.vocab_size < 16:
            problems.append(f"vocab_size must be >= 16, got {self.vocab_size}")
        if problems:
            raise ConfigError("invalid recipe: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_align_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> AlignConfig:
    """A validated :class:`AlignConfig` from a YAML recipe (optional) and ``key=value`` overrides.

    Examples
    --------
    >>> config = load_align_recipe("align_tiny", ["pairs=pairs.csv", "epochs=5"])  # doctest: +SKIP
    """
    return build_config(AlignConfig, read_recipe(path, overrides, package="histoscope.train.align")).validate()
