"""Registered report models: HistoGPT's published sizes and a tiny test variant.

The published configs come from the reference repository: the 1B model is
``HistoGPTForCausalLM(BioGptConfig(), PerceiverResamplerConfig())`` (BioGPT, 1024 wide,
24 layers), the 3B model the same resampler with BioGPT-Large's config
(``biogpt-large-config.json``: 1600 wide, 48 layers, 25 heads). A checkpoint's sizes
override these (see :func:`infer_histogpt_config`), so either file loads under
either name.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from torch import Tensor

from histoscope.language.histogpt import HistoGPT, from_official_keys, official_key
from histoscope.language.registry import register_report_model
from histoscope.layers.perceiver import PerceiverResampler

__all__ = ["RESAMPLER_FIELDS", "convert_histogpt_checkpoint", "histogpt", "infer_histogpt_config"]

# The reference's PerceiverResamplerConfig field → PerceiverResampler keyword.
RESAMPLER_FIELDS = {"dim_feats": "in_dim", "dim_model": "dim", "dim_head": "dim_head", "num_heads": "heads",
                    "num_layers": "depth", "num_latents": "num_latents"}
BIOGPT_HEAD_DIM = 64  # BioGPT and BioGPT-Large: head counts are not in a checkpoint, head width is

_RESAMPLER_1B = {"dim_feats": 768, "dim_model": 1536, "dim_head": 96, "num_heads": 16, "num_layers": 6,
                 "num_latents": 640}
_BIOGPT = {"vocab_size": 42384, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
           "intermediate_size": 4096, "max_position_embeddings": 1024}  # transformers' BioGptConfig() defaults
_BIOGPT_LARGE = {"vocab_size": 57717, "hidden_size": 1600, "num_hidden_layers": 48, "num_attention_heads": 25,
                 "intermediate_size": 6400, "max_position_embeddings": 2048}
_TIED = (("lm.output_projection.weight", "lm.biogpt.embed_tokens.weight"),)
_PAPER = ("Tran et al., Generating dermatopathology reports from gigapixel whole slide images with HistoGPT, "
          "Nat. Commun. 2025")


def histogpt(*, lm_config: dict[str, Any], resampler_config: dict[str, Any], ff_mult: int = 4) -> HistoGPT:
    """HistoGPT from a ``BioGptConfig`` dict and the reference's resampler fields."""
    from transformers import BioGptConfig, BioGptForCausalLM  # heavy import, only when a model is built

    known = set(BioGptConfig().to_dict())
    unknown = sorted(set(lm_config) - known)
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        raise ValueError("lm_config: unknown BioGptConfig fields "
                         + ", ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items()))
    unknown = sorted(set(resampler_config) - set(RESAMPLER_FIELDS))
    missing = sorted(set(RESAMPLER_FIELDS) - set(resampler_config))
    if unknown or missing:
        raise ValueError(f"resampler_config needs exactly the fields {list(RESAMPLER_FIELDS)} "
                         f"(unknown: {unknown}, missing: {missing})")
    resampler = PerceiverResampler(**{RESAMPLER_FIELDS[k]: v for k, v in resampler_config.items()})
    return HistoGPT(resampler=resampler, language_model=BioGptForCausalLM(BioGptConfig(**lm_config)), ff_mult=ff_mult)


def convert_histogpt_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' layout (``histogpt.*``, ``output_projection.weight``) → ours; a state
    dict already in our layout passes through."""
    official = any(k.startswith("histogpt.") or k == "output_projection.weight" for k in state)
    return from_official_keys(state) if official else dict(state)


def _count_layers(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def infer_histogpt_config(state: dict[str, Tensor], lm_config: dict[str, Any],
                          resampler_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sizes read off a checkpoint (our key layout), given the configs so far.

    Head counts are not stored: the given ones are kept while the width they divide is
    unchanged; otherwise BioGPT's 64-wide heads and the resampler's ``dim_head``.
    """
    vocab, width = state["lm.biogpt.embed_tokens.weight"].shape
    lm = {"vocab_size": vocab, "hidden_size": width,
          "max_position_embeddings": state["lm.biogpt.embed_positions.weight"].shape[0] - 2,  # BioGPT's offset 2
          "num_hidden_layers": _count_layers(state, "lm.biogpt.layers."),
          "intermediate_size": state["lm.biogpt.layers.0.1.fc1.weight"].shape[0]}
    if width != lm_config.get("hidden_size"):
        if width % BIOGPT_HEAD_DIM:
            raise ValueError(f"width {width} is not a multiple of {BIOGPT_HEAD_DIM}: "
                             "pass lm_config={'num_attention_heads': ...}")
        lm["num_attention_heads"] = width // BIOGPT_HEAD_DIM
    dim_model, dim_feats = state["resampler.linear.weight"].shape
    inner = state["resampler.layers.0.0.to_q.weight"].shape[0]
    resampler = {"dim_feats": dim_feats, "dim_model": dim_model, "num_latents": state["resampler.latents"].shape[0],
                 "num_layers": _count_layers(state, "resampler.layers.")}
    if inner != resampler_config.get("dim_head", 0) * resampler_config.get("num_heads", 0):
        dim_head = resampler_config.get("dim_head", _RESAMPLER_1B["dim_head"])
        if inner % dim_head:
            raise ValueError(f"resampler attention width {inner} is not a multiple of dim_head {dim_head}: "
                             "pass resampler_config={'dim_head': ..., 'num_heads': ...}")
        resampler.update(dim_head=dim_head, num_heads=inner // dim_head)
    return lm, resampler


_CHECKPOINT = {"convert_checkpoint": convert_histogpt_checkpoint, "infer_config": infer_histogpt_config,
               "checkpoint_key": official_key, "tie_keys": _TIED, "license": "Apache-2.0", "paper": _PAPER}


_TINY_LM = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64}
_TINY_RESAMPLER = {"dim_feats": 16, "dim_model": 24, "dim_head": 8, "num_heads": 2, "num_layers": 2, "num_latents": 6}


register_report_model(
    "histogpt", description="HistoGPT-1B: CTransPath features → Perceiver (640 latents) → BioGPT + gated x-attn",
    lm_config=_BIOGPT, resampler_config=_RESAMPLER_1B, hf_repo="marr-peng-lab/histogpt",
    hf_filename="histogpt-1b-6k-pruned.pth", tokenizer="microsoft/biogpt", tiny=(_TINY_LM, _TINY_RESAMPLER),
    **_CHECKPOINT)(histogpt)
register_report_model(
    "histogpt_3b", description="HistoGPT-3B: the same resampler with BioGPT-Large (1600 wide, 48 layers)",
    lm_config=_BIOGPT_LARGE, resampler_config=_RESAMPLER_1B, hf_repo="marr-peng-lab/histogpt",
    hf_filename="histogpt-3b-6k-pruned.pth", tokenizer="microsoft/BioGPT-Large", tiny=(_TINY_LM, _TINY_RESAMPLER),
    **_CHECKPOINT)(histogpt)
register_report_model(
    "histogpt_test", description="tiny HistoGPT for tests (BioGPT 32 wide, 2 layers, 64-token vocabulary)",
    lm_config=_TINY_LM, resampler_config=_TINY_RESAMPLER, **_CHECKPOINT)(histogpt)
