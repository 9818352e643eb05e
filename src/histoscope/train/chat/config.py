"""``histoscope train-chat`` recipes: YAML plus ``key=value`` overrides, checked against :class:`ChatConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.train.config import PRECISIONS, ConfigError, build_config, read_recipe

__all__ = ["ChatConfig", "ChatModelConfig", "LoraSettings", "StageConfig", "load_chat_recipe"]

LM_MODES = ("frozen", "full", "lora")


@dataclass
class ChatModelConfig:
    """The assistant's parts (:func:`histoscope.language.chat.build_chat_model`)."""

    lm_path: str | None = None  # a local Hugging Face causal-LM folder (e.g. Llama-2-7b-chat-hf)
    lm_config: dict = field(default_factory=dict)  # with lm_path null: model_type + fields (from scratch)
    projector: str = "mlp2x_gelu"  # or linear
    compressor: str = "perceiver"  # perceiver (slides), attention_pool or none (a tile's patch tokens)
    num_image_tokens: int = 64  # K: latents of the resampler / queries of the pooling
    resampler: dict = field(default_factory=dict)  # PerceiverResampler keywords: dim, depth, dim_head, heads
    pool_heads: int = 1
    encoder: str | None = None  # registered tile encoder for tile images (its patch tokens)
    encoder_weights: str | None = None  # its weights file ("random" for tests)
    encoder_arch: dict = field(default_factory=dict)


@dataclass
class StageConfig:
    """One LLaVA stage: what trains, for how long, how fast."""

    epochs: int = 1
    lm: str = "frozen"  # frozen | full | lora (stage 1 must be frozen)
    lr: float = 1e-3
    weight_decay: float = 0.0  # not on biases and norms
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    grad_clip: float | None = 1.0


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ChatConfig:
    """Everything a ``train-chat`` run depends on; saved as ``OUT/config.yaml``."""

    conversations: str = ""  # LLaVA JSON
    features_dir: str | None = None  # slide ids → <features_dir>/<id>.h5
    images_dir: str | None = None  # relative image paths
    out: str = "runs/chat"  # the run folder
    model: ChatModelConfig = field(default_factory=ChatModelConfig)
    template: str = "llava_v1"
    tokenizer: str | None = None  # folder; null: lm_path's, else a BPE trained on the conversations
    vocab_size: int = 2000  # of that BPE
    max_length: int = 2048  # tokens per conversation (longer ones are cut)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lm="frozen", lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=3, lm="full", lr=2e-4))
    lora: LoraSettings = field(default_factory=LoraSettings)
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on AMX CPUs and recent GPUs, else fp32

    def validate(self) -> ChatConfig:
        problems = []
        if not self.conversations:
            problems.append("conversations is required (a LLaVA JSON file)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stage1.lm != "frozen":
            problems.append(f"stage1.lm must be frozen (stage 1 trains the projector only), got {self.stage1.lm!r}")
        if self.stage2.lm not in LM_MODES:
            problems.append(f"stage2.lm must be one of {', '.join(LM_MODES)}, got {self.stage2.lm!r}")
        for name, stage in (("stage1", self.stage1), ("stage2", self.stage2)):
            if stage.epochs < 0 or stage.batch_size < 1 or stage.lr <= 0:
                problems.append(f"{name}: epochs must be >= 0, batch_size >= 1 and lr > 0")
        if self.model.lm_path is None and "model_type" not in self.model.lm_config:
            problems.append("model.lm_path (a local LM folder) or model.lm_config with a model_type is required")
        if not 0 <= self.val_fraction < 1:
            problems.append("val_fraction must be in [0, 1)")
        if self.vocab_size < 64:
            problems.append(f"vocab_size must be >= 64, got {self.vocab_size}")
        if problems:
            raise ConfigError("invalid recipe: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_chat_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> ChatConfig:
    """A validated :class:`ChatConfig` from a YAML recipe (optional) and ``key=value`` overrides.

    Examples
    --------
    >>> load_chat_recipe("chat_tiny", ["conversations=conv.json", "features_dir=feats"])  # doctest: +SKIP
    """
    return build_config(ChatConfig, read_recipe(path, overrides, package="histoscope.train.chat")).validate()
