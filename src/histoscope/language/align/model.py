"""The image–text model: an image tower, a text tower, a learned temperature and, for
CoCa, a captioning decoder.

Its forward follows open_clip's CoCa (CONCH's ``CoCa.forward``): L2-normalised image
and text embeddings, ``exp(logit_scale)``, and the decoder's logits over the caption
with the labels they predict (the caption shifted by one).

Notation: B pairs, E joint embedding dim, L tokens, T = L − 1 decoded positions,
V vocabulary, Q image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlignModel", "AlignOutput", "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100)  # CLIP clips the learned scale at 100


@dataclass
class AlignOutput:
    image_embedding: torch.Tensor  # (B, E), L2-normalised
    text_embedding: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # () exp(logit_scale)
    caption_logits: torch.Tensor | None  # (B, T, V) or None without a decoder
    caption_labels: torch.Tensor | None  # (B, T) the token each position predicts


class AlignModel(nn.Module):
    """``visual`` + ``text`` (+ ``text_decoder``) + ``logit_scale``, named as in CONCH's checkpoint.

    ``visual(x, mask, with_tokens=)`` returns an
    :class:`~histoscope.language.align.towers.ImageOutput`; ``text(ids)`` returns
    ``(embedding, token states)`` and tells with ``embed_cls`` whether it appends a
    class token (then the tokenizer's last position, a placeholder, is dropped first)
    and with ``causal`` whether its token states may feed the captioning decoder.
    """

    def __init__(self, *, visual: nn.Module, text: nn.Module, text_decoder: nn.Module | None = None,
                 init_logit_scale: float = INIT_LOGIT_SCALE):
        super().__init__()
        if text_decoder is not None and not text.causal:
            raise ValueError(f"a captioning decoder needs a causal text tower; {type(text).__name__} sees the whole "
                             "caption (use the CoCa text tower, or no decoder)")
        self.visual = visual
        self.text = text
        self.text_decoder = text_decoder
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)

    @property
    def pad_id(self) -> int:
        return self.text.pad_id

    def transform(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, H, W, 3) -> (N, 3, h, w) float32 with the image tower's published preprocessing."""
        from histoscope.encoders import preprocess_tiles

        if self.visual.preprocess is None:
            raise ValueError("this model's image tower reads features, not images")
        return preprocess_tiles(tiles, self.visual.preprocess)

    def encode_image(self, images: torch.Tensor, mask: torch.Tensor | None = None, *,
                     normalize: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) or features (B, N, D) with mask (B, N) -> (B, E)."""
        embedding = self.visual(images, mask).embedding
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def _text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(ids[:, :-1] if self.text.embed_cls else ids)

    def encode_text(self, ids: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Token ids (B, L) as the model's tokenizer writes them -> (B, E)."""
        embedding = self._text(ids)[0]
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                caption: bool = True) -> AlignOutput:
        """Images (B, 3, H, W) or features (B, N, D) with mask (B, N), and token ids (B, L);
        ``caption=False`` skips the decoder (contrastive training only)."""
        captioning = caption and self.text_decoder is not None
        image = self.visual(images, mask, with_tokens=captioning)
        text_embedding, token_states = self._text(ids)  # (B, E), (B, T, W)
        logits = labels = None
        if captioning:
            logits = self.text_decoder(image.tokens, token_states, image.mask)  # (B, T, V)
            labels = ids[:, -token_states.shape[1]:]  # the next token at each decoded position
        return AlignOutput(image_embedding=F.normalize(image.embedding, dim=-1),
                           text_embedding=F.normalize(text_embedding, dim=-1),
                           logit_scale=self.logit_scale.exp(), caption_logits=logits, caption_labels=labels)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep ``exp(logit_scale)`` within [1, 100], as CLIP does after every optimizer step."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
