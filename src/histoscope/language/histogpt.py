"""HistoGPT (Tran et al., Nat. Commun. 2025): tile features of a slide → pathology report.

Notation: B slides (or prompts), N tiles, D tile feature dim (``dim_feats``), L latents,
M resampler width (``dim_model``), E decoder width, T tokens, V vocabulary.

::

    features (B, N, D) ─ PerceiverResampler ─ (B, L, M) ─ exit gate (Linear M→E, no bias) ─ latents (B, L, E)
    tokens (B, T) ─ BioGPT, a GatedCrossAttentionBlock on the latents before each decoder layer ─ logits (B, T, V)

BioGPT is ``transformers``' ``BioGptForCausalLM``; the blocks are put in front of its
decoder layers by :class:`~histoscope.language.fusion.FusionLayer`, so its embeddings
(× √E), learned positions (offset 2, counted over real tokens), pre-LayerNorm decoder
layers (exact-erf GELU), final LayerNorm and output projection (tied to the token
embedding) are the library's. Each block's text LayerNorm and the resampler's layers
use ``nn.LayerNorm``'s eps 1e-5; the latents reach every block as they leave the exit
gate (no norm), each block with its own keys/values; without features the blocks are
skipped and the model is BioGPT alone — all as in the reference
(``histogpt/models/histogpt.py``).

Differences from the reference that leave its outputs unchanged: padded tiles
(``mask``) are removed from the resampler's keys (the reference has no mask); the
resampler runs in the model's dtype (the reference casts features to float32);
``generate`` computes the latents and every block's keys/values once per slide and
keeps a KV cache for self-attention, where the reference re-runs the whole model,
resampler included, for every new token.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histoscope.language import generation
from histoscope.language.fusion import FusionLayer, GatedCrossAttentionBlock, MediaKV
from histoscope.layers.perceiver import PerceiverResampler

__all__ = ["FROM_MODEL", "RESAMPLER_FIELDS", "HistoGPT", "ReportOutput", "convert_histogpt_checkpoint",
           "from_official_keys", "histogpt", "infer_histogpt_config", "official_key", "to_official_keys"]

# The reference's PerceiverResamplerConfig field → PerceiverResampler keyword.
RESAMPLER_FIELDS = {"dim_feats": "in_dim", "dim_model": "dim", "dim_head": "dim_head", "num_heads": "heads",
                    "num_layers": "depth", "num_latents": "num_latents"}
BIOGPT_HEAD_DIM = 64  # BioGPT and BioGPT-Large: head counts are not in a checkpoint, head width is
PUBLISHED_RESAMPLER_DIM_HEAD = 96  # HistoGPT's resampler heads (16 of 96)
IGNORE_INDEX = -100  # label value left out of the loss (PyTorch's and Hugging Face's convention)

# The authors' state_dict prefixes (``HistoGPTForCausalLM``) and ours; longest first.
_OFFICIAL_PREFIXES = (
    ("histogpt.perceiver_resampler.", "resampler."),
    ("histogpt.perceiver_exitgate.", "exit_gate."),
    ("histogpt.", "lm.biogpt."),
    ("output_projection.", "lm.output_projection."),
)
_TO_OFFICIAL = tuple(sorted(((ours, theirs) for theirs, ours in _OFFICIAL_PREFIXES), key=lambda p: -len(p[0])))


class _FromModel:
    def __repr__(self) -> str:
        return "FROM_MODEL"


FROM_MODEL = _FromModel()  # default for eos_token_id: the end token the model's config names


@dataclass
class ReportOutput:
    """``logits (B, T, V)``; ``loss`` (mean next-token cross-entropy) when labels are given;
    ``latents (B, L, E)`` the decoder attended to (None without features)."""

    logits: Tensor
    loss: Tensor | None = None
    latents: Tensor | None = None


def from_official_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' key layout (``histogpt.*``, ``output_projection.weight``) → ours."""
    return {_rename(key, _OFFICIAL_PREFIXES): value for key, value in state.items()}


def to_official_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our key layout → the authors' (what their ``HistoGPTForCausalLM`` loads strictly)."""
    return {official_key(key): value for key, value in state.items()}


def official_key(key: str) -> str:
    """One of our keys as the authors name it."""
    return _rename(key, _TO_OFFICIAL)


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


class HistoGPT(nn.Module):
    """Perceiver resampler + BioGPT with gated cross-attention before every decoder layer.

    Parameters
    ----------
    resampler : PerceiverResampler
        Tiles ``(B, N, D)`` → ``(B, L, M)``.
    language_model : transformers.BioGptForCausalLM
        The decoder (any size); a :class:`GatedCrossAttentionBlock` is put in front of
        each of its layers, in place.
    ff_mult : int
        Feed-forward expansion of the cross-attention blocks (HistoGPT: 4).
    """

    def __init__(self, *, resampler: PerceiverResampler, language_model: nn.Module, ff_mult: int = 4):
        super().__init__()
        config = language_model.config
        width, heads = config.hidden_size, config.num_attention_heads
        self.resampler = resampler
        self.exit_gate = nn.Linear(resampler.latents.shape[-1], width, bias=False)
        layers = language_model.base_model.layers
        for i, layer in enumerate(layers):
            layers[i] = FusionLayer(block=GatedCrossAttentionBlock(dim=width, dim_head=width // heads, heads=heads,
                                                                   ff_mult=ff_mult), layer=layer)
        self.lm = language_model
        self._init_like_reference(config.initializer_range)

    def _init_like_reference(self, std: float) -> None:
        """The reference's ``post_init``: Linear weights N(0, std); LayerNorms 1/0 (their
        default); the latents and media position stay N(0, 1), the gates 0."""
        for module in [self.resampler, self.exit_gate, *(layer.block for layer in self.fusion_layers)]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)

    @property
    def fusion_layers(self) -> list[FusionLayer]:
        return list(self.lm.base_model.layers)

    @property
    def config(self):
        """The decoder's ``BioGptConfig`` (vocabulary, end/pad token ids, sizes)."""
        return self.lm.config

    @property
    def dim_feats(self) -> int:
        """D, the tile feature dim the model reads."""
        return self.resampler.linear.in_features

    def encode(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """``features (B, N, D)``, ``mask (B, N)`` bool (True = real tile) → latents ``(B, L, E)``.

        With a mask, each slide goes through the resampler alone, over its real tiles:
        no work on padding, and no masked attention, which CPU kernels run by
        materialising every (latent, tile) score (1.3 GB for 8 slides of 2,000 tiles).
        """
        if features.ndim != 3 or features.shape[-1] != self.dim_feats:
            raise ValueError(f"features must be (B, N, {self.dim_feats}) tile features, got {tuple(features.shape)}; "
                             f"this model was built for dim_feats={self.dim_feats}")
        features = features.to(device=self.exit_gate.weight.device, dtype=self.exit_gate.weight.dtype)
        if mask is None:
            return self.exit_gate(self.resampler(features))
        mask = mask.to(device=features.device, dtype=torch.bool)
        return self.exit_gate(torch.cat([self.resampler(features[b:b + 1, mask[b]]) for b in range(len(features))]))

    def media_kv(self, latents: Tensor) -> list[MediaKV]:
        """Every block's cross-attention keys and values for ``latents (B, L, E)``."""
        return [layer.block.media_kv(latents) for layer in self.fusion_layers]

    @contextlib.contextmanager
    def conditioned_on(self, media_kv: Sequence[MediaKV] | None) -> Iterator[None]:
        """Within the block, calls of ``self.lm`` attend to ``media_kv`` (one per layer;
        None: no slide, BioGPT alone)."""
        layers = self.fusion_layers
        if media_kv is not None and len(media_kv) != len(layers):
            raise ValueError(f"{len(media_kv)} key/value pairs for {len(layers)} cross-attention layers")
        try:
            for i, layer in enumerate(layers):
                layer.media_kv = None if media_kv is None else media_kv[i]
            yield
        finally:
            for layer in layers:
                layer.media_kv = None

    def _slide_kv(self, features: Tensor | None, mask: Tensor | None, rows: int,
                  repeats: int = 1) -> tuple[Tensor | None, list[MediaKV] | None]:
        """Latents and keys/values for ``rows`` prompts (a single slide is shared by all),
        each slide's repeated ``repeats`` times (beams)."""
        if features is None:
            return None, None
        latents = self.encode(features, mask)
        if latents.shape[0] != rows:
            if latents.shape[0] != 1:
                raise ValueError(f"{latents.shape[0]} slides for {rows} prompts: give one slide per prompt, "
                                 "or one slide for all")
            latents = latents.expand(rows, -1, -1)
        kv = self.media_kv(latents)
        if repeats > 1:
            kv = [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in kv]
        return latents, kv

    def forward(self, input_ids: Tensor, features: Tensor | None = None, mask: Tensor | None = None, *,
                attention_mask: Tensor | None = None, labels: Tensor | None = None) -> ReportOutput:
        """Next-token logits for ``input_ids (B, T)`` given the slides' ``features (B, N, D)``.

        Parameters
        ----------
        input_ids : Tensor
            ``(B, T)`` token ids.
        features, mask : Tensor, optional
            Padded tile features ``(B, N, D)`` (or ``(1, N, D)`` for all prompts) and
            ``mask (B, N)``, True for real tiles; no features: the text-only BioGPT.
        attention_mask : Tensor, optional
            ``(B, T)``, 0 at padding tokens; positions count real tokens only.
        labels : Tensor, optional
            ``(B, T)`` targets (usually ``input_ids``, padding set to -100); the loss
            predicts ``labels[:, t+1]`` from position t, as the reference does.
        """
        latents, kv = self._slide_kv(features, mask, rows=input_ids.shape[0])
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        with self.conditioned_on(kv):
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return ReportOutput(logits=logits, loss=loss, latents=latents)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, features: Tensor | None = None, mask: Tensor | None = None, *,
                 attention_mask: Tensor | None = None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None | _FromModel = FROM_MODEL,
                 pad_token_id: int | None = None, seed: int | None = None, use_cache: bool = True) -> Tensor:
        """Write reports: prompt ids ``(B, T)`` (left-padded, see
        :func:`~histoscope.language.generation.left_pad`) and slides ``(B, N, D)`` →
        ``(B, T + n)`` token ids.

        The latents and every block's keys/values are computed once per slide; the
        decoding loop is :func:`histoscope.language.generation.generate` (greedy,
        sampling, beam search; see there for the arguments). ``eos_token_id`` defaults
        to the config's end token (``</s>``, 2, for BioGPT, where the reference stops);
        None never stops early. ``pad_token_id`` defaults to the config's. Dropout
        follows the module's mode, as in ``transformers``: call ``model.eval()`` first.
        """
        longest = input_ids.shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"a {longest}-token prompt plus max_new_tokens={max_new_tokens} exceeds the "
                             f"{self.config.max_position_embeddings} positions this model has learned; "
                             "shorten the prompt or lower max_new_tokens")
        if eos_token_id is FROM_MODEL:
            eos_token_id = self.config.eos_token_id
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id
        _, kv = self._slide_kv(features, mask, rows=input_ids.shape[0], repeats=num_beams)
        with self.conditioned_on(kv):
            return generation.generate(
                self.lm, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                length_penalty=length_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                use_cache=use_cache)

    def load_biogpt_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a ``transformers`` ``BioGptForCausalLM`` state dict (e.g. microsoft/biogpt)
        into the decoder, strictly; the resampler, exit gate and cross-attention blocks
        keep their weights (how HistoGPT starts training)."""
        pattern = re.compile(r"biogpt\.layers\.(\d+)\.")
        mapped = {pattern.sub(r"biogpt.layers.\1.1.", key): value for key, value in state.items()}
        expected = {k for k in self.lm.state_dict() if not re.match(r"biogpt\.layers\.\d+\.0\.", k)}
        missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        if "output_projection.weight" in missing and "biogpt.embed_tokens.weight" in mapped:
            missing.remove("output_projection.weight")  # tied to the token embedding
        if missing or unexpected:
            raise KeyError(f"not a BioGptForCausalLM state dict of this size: {len(missing)} missing keys "
                           f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}")
        self.lm.load_state_dict(mapped, strict=False)  # strict on the decoder: checked above

    def official_state_dict(self) -> dict[str, Tensor]:
        """The weights in the authors' key layout (loads strictly into their
        ``HistoGPTForCausalLM`` built with the same configs)."""
        return to_official_keys(self.state_dict())


# ---- building from configs, reading the authors' checkpoints ---------------------------

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
        dim_head = resampler_config.get("dim_head", PUBLISHED_RESAMPLER_DIM_HEAD)
        if inner % dim_head:
            raise ValueError(f"resampler attention width {inner} is not a multiple of dim_head {dim_head}: "
                             "pass resampler_config={'dim_head': ..., 'num_heads': ...}")
        resampler.update(dim_head=dim_head, num_heads=inner // dim_head)
    return lm, resampler

