"""The assistant's model: image tokens → multimodal projector → any Hugging Face causal LM.

Notation: B conversations, N image tokens in (tiles of a slide, or a tile's patch tokens),
D their width, K image tokens into the LM, E the LM's embedding width, T tokens, V vocabulary.

::

    image tokens (B, N, D) ─ compressor ─ (B, K, D') ─ projector ─ (B, K, E)
    token ids (B, T), K placeholders each ─ LM embeddings with the placeholders replaced ─ LM ─ logits (B, T, V)

The compressor is LLaVA's "none" (a tile's patch tokens as they are), attention pooling
to K tokens (:class:`~histoscope.layers.attention_pool.AttentionPool`), or the Perceiver
resampler (:class:`~histoscope.layers.perceiver.PerceiverResampler`, K latents), which
slides need: their thousands of tiles become K tokens. The projector is LLaVA's
``linear`` or ``mlp2x_gelu`` (``Linear → GELU → Linear``, its ``mm_projector`` keys
``0`` and ``2``). The LM is any ``AutoModelForCausalLM``: Llama-style, BioGPT, …,
read from a local folder or built from a config.

``forward`` follows a Hugging Face causal LM's call convention (``input_ids``,
``attention_mask``, ``position_ids``, ``cache``, ``use_cache``), so the shared decoding
loop (:mod:`histoscope.language.generation`) runs it as it runs any LM.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histoscope.language.chat.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from histoscope.layers.attention_pool import AttentionPool
from histoscope.layers.perceiver import PerceiverResampler

__all__ = ["COMPRESSORS", "PROJECTORS", "ChatModel", "build_causal_lm", "build_chat_model", "build_projector"]

PROJECTORS = ("linear", "mlp2x_gelu")
COMPRESSORS = ("none", "attention_pool", "perceiver")


def build_projector(kind: str, *, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's ``mm_projector``: ``linear`` or ``mlp2x_gelu``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}")


def build_causal_lm(*, lm_path: str | Path | None = None, lm_config: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """A Hugging Face causal LM from a local folder (its weights), or from a config (random
    weights, for training from scratch: ``lm_config`` holds ``model_type`` and its fields)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if lm_path is not None:
        path = Path(lm_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json); pass the local folder "
                                    "of a causal LM (e.g. a Llama-2 snapshot), or lm_path=null with an lm_config")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, **(lm_config or {}))
        return AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True, dtype=dtype)
    config = dict(lm_config or {})
    if "model_type" not in config:
        raise ValueError("lm_config needs a model_type (e.g. llama, biogpt) when no lm_path is given")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return model if dtype is None else model.to(dtype)


class ChatModel(nn.Module):
    """Compressor + projector + causal LM (see the module docstring).

    Parameters
    ----------
    lm : nn.Module
        A Hugging Face causal LM (possibly wrapped by ``peft``).
    image_dim : int
        D.
    projector : str
        ``linear`` or ``mlp2x_gelu``.
    compressor : nn.Module, optional
        ``(B, N, D), mask (B, N) → (B, K, D')``; None passes the tokens through.
    compressed_dim : int, optional
        D' (default D).
    """

    def __init__(self, *, lm: nn.Module, image_dim: int, projector: str = "mlp2x_gelu",
                 compressor: nn.Module | None = None, compressed_dim: int | None = None):
        super().__init__()
        self.lm = lm
        self.image_dim = int(image_dim)
        self.compressor = compressor
        width = lm.get_input_embeddings().embedding_dim
        self.projector = build_projector(projector, in_dim=compressed_dim or image_dim, out_dim=width)

    @property
    def base_lm(self) -> nn.Module:
        """The Hugging Face LM itself (under a ``peft`` wrapper, its base model)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def image_tokens(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """``tokens (B, N, D)``, ``mask (B, N)`` → the LM-space image tokens ``(B, K, E)``."""
        if tokens.shape[-1] != self.image_dim:
            raise ValueError(f"image tokens are {tokens.shape[-1]}-dim but the assistant was trained on "
                             f"{self.image_dim}-dim ones: use features of the encoder it was trained with")
        dtype = self.projector_dtype
        tokens = tokens.to(dtype)
        if self.compressor is not None:
            tokens = self.compressor(tokens, mask)
        return self.projector(tokens)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None = None) -> Tensor:
        """Token embeddings ``(B, T, E)``, the placeholders of each row holding an image
        replaced in order by that row's ``image_embeds``: ``(B, K, E)`` for every row, or
        ``(n, K, E)`` for the n rows with placeholders."""
        placeholders = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(min=0))
        if not placeholders.any():
            return embeds
        if image_embeds is None:
            raise ValueError("the prompt has image placeholders but no image was given")
        rows = placeholders.any(dim=1)
        if image_embeds.shape[0] == len(input_ids) and image_embeds.shape[0] != int(rows.sum()):
            image_embeds = image_embeds[rows]
        counts = placeholders.sum(dim=1)[rows]
        if image_embeds.shape[0] != len(counts) or (counts != image_embeds.shape[1]).any():
            raise ValueError(f"{counts.tolist()} image placeholders per row for image tokens of shape "
                             f"{tuple(image_embeds.shape)}")
        return embeds.masked_scatter(placeholders[..., None], image_embeds.to(embeds.dtype))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, use_cache: bool = False, labels: Tensor | None = None,
                image_embeds: Tensor | None = None):
        """Hugging Face outputs (``logits (B, T, V)``, the cache) and, with ``labels (B, T)``,
        ``loss``: next-token cross-entropy over the labelled (answer) tokens."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache,
                  _cache_kwarg(self.base_lm): cache}
        out = self.lm(inputs_embeds=self.embed(input_ids, image_embeds), **kwargs)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)
        return out


def _cache_kwarg(lm: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def build_chat_model(*, image_dim: int, lm_path: str | None = None, lm_config: dict[str, Any] | None = None,
                     projector: str = "mlp2x_gelu", compressor: str = "perceiver", num_image_tokens: int = 64,
                     resampler: dict[str, Any] | None = None, pool_heads: int = 1,
                     lm_dtype: torch.dtype | None = None) -> ChatModel:
    """A :class:`ChatModel` from flat settings (what a run folder records).

    ``resampler`` holds :class:`~histoscope.layers.perceiver.PerceiverResampler` keywords
    (``dim``, ``depth``, ``dim_head``, ``heads``, ``ff_mult``); its ``in_dim`` is
    ``image_dim`` and its latents ``num_image_tokens``.
    """
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; use one of {', '.join(COMPRESSORS)}")
    lm = build_causal_lm(lm_path=lm_path, lm_config=lm_config, dtype=lm_dtype)
    module, width = None, image_dim
    if compressor == "perceiver":
        settings = {"dim": image_dim, **(resampler or {})}
        module = PerceiverResampler(in_dim=image_dim, num_latents=num_image_tokens, **settings)
        width = settings["dim"]
    elif compressor == "attention_pool":
        module = AttentionPool(dim=image_dim, num_queries=num_image_tokens, heads=pool_heads)
    return ChatModel(lm=lm, image_dim=image_dim, projector=projector, compressor=module, compressed_dim=width)
