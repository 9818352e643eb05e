"""Generic towers: any tile encoder (or precomputed features) and any Hugging Face text encoder.

An image tower maps images (B, 3, H, W) or features (B, N, D) to an :class:`ImageOutput`;
a text tower maps token ids (B, L) to ``(embedding (B, E), token states (B, L, W))``.
CONCH's own towers (:mod:`histoscope.language.align.conch`, :mod:`~.coca`) keep the same
interface.

Notation: B samples, N feature tokens per sample (1 for a tile embedding), D feature
dim, E joint embedding dim, Q caption tokens, W text width, L tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ImageOutput", "EncoderImageTower", "HFTextTower", "masked_mean"]

PROJECTIONS = ("linear", "mlp")


class ImageOutput(NamedTuple):
    embedding: torch.Tensor  # (B, E), before L2 normalisation
    tokens: torch.Tensor | None  # (B, Q, W) for the captioning decoder, or None
    mask: torch.Tensor | None  # (B, Q) True on real tokens, or None (all real)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) averaged over the tokens where ``mask`` (B, N) is True -> (B, D)."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


def _projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    # open_clip's timm-tower heads: a bias-free linear map, or an MLP to 2·E and back
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, 2 * out_dim), nn.GELU(), nn.Linear(2 * out_dim, out_dim, bias=False))
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


class EncoderImageTower(nn.Module):
    """A tile encoder's embedding -- or precomputed features -- projected into the joint space.

    With ``encoder`` (a :class:`~histoscope.encoders.TileEncoder`), inputs are
    preprocessed images (B, 3, H, W) and the encoder's embedding is the one token.
    Without, inputs are features (B, D) or (B, N, D) with a mask (B, N) (the tiles of a
    features file): the contrastive embedding projects their mean and the captioning
    decoder attends to every one. A frozen encoder stays in eval mode and gets no
    gradient (LiT's locked image tower).
    """

    def __init__(self, *, in_dim: int, embed_dim: int, encoder: nn.Module | None = None, freeze_encoder: bool = True,
                 proj: str = "linear", caption_width: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder and encoder is not None
        if self.freeze_encoder:
            encoder.requires_grad_(False)
        self.proj = _projection(proj, in_dim, embed_dim)
        if caption_width is not None:
            self.caption_proj = nn.Linear(in_dim, caption_width)
            self.ln_caption = nn.LayerNorm(caption_width)
        else:
            self.caption_proj = self.ln_caption = None

    @property
    def preprocess(self):
        """The encoder's published preprocessing (None for features input)."""
        return self.encoder.spec.preprocess if self.encoder is not None else None

    def train(self, mode: bool = True) -> EncoderImageTower:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, with_tokens: bool = False) -> ImageOutput:
        if self.encoder is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
                tokens = self.encoder(x).unsqueeze(1)  # (B, 1, D)
            mask = None
        else:
            tokens = x.unsqueeze(1) if x.ndim == 2 else x  # (B, N, D)
        embedding = self.proj(masked_mean(tokens.to(self.proj_dtype), mask))  # (B, E)
        caption = None
        if with_tokens:
            if self.caption_proj is None:
                raise ValueError("this image tower has no caption tokens (built without caption_width)")
            caption = self.ln_caption(self.caption_proj(tokens.to(self.proj_dtype)))  # (B, N, W)
        return ImageOutput(embedding, caption, mask)

    @property
    def proj_dtype(self) -> torch.dtype:
        return next(self.proj.parameters()).dtype


class HFTextTower(nn.Module):
    """A Hugging Face text encoder (``AutoModel``) plus a bias-free projection into the joint space.

    The caption's embedding is the first token's final state (``pooling="cls"``, BERT's
    class token) or the mean over its non-padding tokens (``"mean"``). The encoder sees
    the whole caption at once, so it cannot feed CoCa's captioning decoder.
    """

    embed_cls = False
    causal = False

    def __init__(self, *, model: nn.Module, embed_dim: int, pad_id: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.pad_id = pad_id
        self.pooling = pooling
        self.width = model.config.hidden_size
        self.proj = nn.Linear(self.width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != self.pad_id  # (B, L)
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, W)
        pooled = states[:, 0] if self.pooling == "cls" else masked_mean(states, mask)
        return self.proj(pooled), states
