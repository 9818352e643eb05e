"""The built-in report models: one registry entry per published model, plus a tiny one.

The published configs come from the reference repository: the 1B model is
``HistoGPTForCausalLM(BioGptConfig(), PerceiverResamplerConfig())`` (BioGPT, 1024 wide,
24 layers), the 3B model the same resampler with BioGPT-Large's config
(``biogpt-large-config.json``: 1600 wide, 48 layers, 25 heads). A checkpoint's sizes
override these (:func:`~histoscope.language.histogpt.infer_histogpt_config`), so either
file loads under either name. The functions behind an entry are imported on first
call, so listing the catalogue does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from histoscope.language.registry import register_report_model

__all__: list[str] = []


def _lazy(name: str) -> Callable[..., Any]:
    """``histoscope.language.histogpt.<name>``, imported on first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("histoscope.language.histogpt"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


_RESAMPLER_1B = {"dim_feats": 768, "dim_model": 1536, "dim_head": 96, "num_heads": 16, "num_layers": 6,
                 "num_latents": 640}
_BIOGPT = {"vocab_size": 42384, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
           "intermediate_size": 4096, "max_position_embeddings": 1024}  # transformers' BioGptConfig() defaults
_BIOGPT_LARGE = {"vocab_size": 57717, "hidden_size": 1600, "num_hidden_layers": 48, "num_attention_heads": 25,
                 "intermediate_size": 6400, "max_position_embeddings": 2048}
_TINY_LM = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64}
_TINY_RESAMPLER = {"dim_feats": 16, "dim_model": 24, "dim_head": 8, "num_heads": 2, "num_layers": 2, "num_latents": 6}
_PAPER = ("Tran et al., Generating dermatopathology reports from gigapixel whole slide images with HistoGPT, "
          "Nat. Commun. 2025")
_CHECKPOINT = {"convert_checkpoint": _lazy("convert_histogpt_checkpoint"),
               "infer_config": _lazy("infer_histogpt_config"), "checkpoint_key": _lazy("official_key"),
               "tie_keys": (("lm.output_projection.weight", "lm.biogpt.embed_tokens.weight"),),
               "license": "Apache-2.0", "paper": _PAPER}
_histogpt = _lazy("histogpt")

register_report_model(
    "histogpt", description="HistoGPT-1B: CTransPath features → Perceiver (640 latents) → BioGPT + gated x-attn",
    lm_config=_BIOGPT, resampler_config=_RESAMPLER_1B, hf_repo="marr-peng-lab/histogpt",
    hf_filename="histogpt-1b-6k-pruned.pth", tokenizer="microsoft/biogpt", tiny=(_TINY_LM, _TINY_RESAMPLER),
    **_CHECKPOINT)(_histogpt)
register_report_model(
    "histogpt_3b", description="HistoGPT-3B: the same resampler with BioGPT-Large (1600 wide, 48 layers)",
    lm_config=_BIOGPT_LARGE, resampler_config=_RESAMPLER_1B, hf_repo="marr-peng-lab/histogpt",
    hf_filename="histogpt-3b-6k-pruned.pth", tokenizer="microsoft/BioGPT-Large", tiny=(_TINY_LM, _TINY_RESAMPLER),
    **_CHECKPOINT)(_histogpt)
register_report_model(
    "histogpt_test", description="tiny HistoGPT for tests (BioGPT 32 wide, 2 layers, 64-token vocabulary)",
    lm_config=_TINY_LM, resampler_config=_TINY_RESAMPLER, **_CHECKPOINT)(_histogpt)
