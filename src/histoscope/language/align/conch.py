"""CONCH (Mahmood lab) as published: CoCa with a ViT-B/16 image tower and a 12-layer text tower.

The model's state dict is the published ``pytorch_model.bin`` key for key:

- ``visual.trunk.*`` (timm ViT-B/16 at 448 px), ``visual.attn_pool_contrast.*``,
  ``visual.ln_contrast.*``, ``visual.proj_contrast`` -- the tile encoder registered as
  ``conch`` (:class:`~histoscope.encoders.conch_tower.ConchVisionTower`), reused here;
- ``visual.attn_pool_caption.*`` (256 queries), ``visual.ln_caption.*`` -- image tokens
  for the captioning decoder;
- ``text.*`` -- :class:`~histoscope.language.align.coca.CoCaTextTower` (context 128,
  vocabulary 32007, width 768, 12 layers, class token appended);
- ``text_decoder.*`` -- :class:`~histoscope.language.align.coca.MultimodalDecoder`;
- ``logit_scale``.

CONCH's tokenizer is a byte-level BPE file (``conch_byte_level_bpe_uncased.json`` in the
authors' repository) read by ``PreTrainedTokenizerFast`` with ``<start_of_text>``,
``<end_of_text>`` and ``<pad>`` (id 0); captions are cut at 127 tokens and a pad is
appended as the class token's placeholder (:class:`~histoscope.language.align.tokenizer.TextTokenizer`).

The published sizes are the registry entry's defaults
(:data:`histoscope.language.align.builders.CONCH_ARCH`).

Notation: B images, T trunk tokens, C trunk width, E joint dim, Q caption queries, W text width.
"""

from __future__ import annotations

import torch
from torch import nn

from histoscope.encoders import Preprocess, get_tile_encoder_spec
from histoscope.encoders.conch_tower import ConchVisionTower
from histoscope.encoders.layers import AttentionalPooler
from histoscope.language.align.coca import CoCaTextTower, MultimodalDecoder
from histoscope.language.align.model import AlignModel
from histoscope.language.align.towers import ImageOutput

__all__ = ["ConchImageTower", "conch"]

class ConchImageTower(ConchVisionTower):
    """CONCH's ``visual``: the registered tile encoder plus the captioning pooler.

    Images (B, 3, H, W) -> :class:`ImageOutput` with the projected contrastive
    embedding (B, E) and, on request, the caption tokens (B, Q, W).
    """

    def __init__(self, *, caption_dim: int, caption_queries: int, preprocess: Preprocess | None, **vision):
        super().__init__(**vision)
        self.attn_pool_caption = AttentionalPooler(dim=caption_dim, context_dim=vision["embed_dim"],
                                                   num_heads=vision["pool_heads"], num_queries=caption_queries)
        self.ln_caption = nn.LayerNorm(caption_dim)
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, with_tokens: bool = False) -> ImageOutput:
        tokens = self.trunk.forward_features(x)  # (B, T, C)
        embedding = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0]) @ self.proj_contrast  # (B, E)
        caption = self.ln_caption(self.attn_pool_caption(tokens)) if with_tokens else None  # (B, Q, W)
        return ImageOutput(embedding, caption, None)


def conch(*, embed_dim: int, vision_width: int, vision_depth: int, vision_heads: int, img_size: int,
          patch_size: int, pool_heads: int, caption_queries: int, vocab_size: int, context_length: int,
          text_width: int, text_heads: int, text_layers: int, decoder_layers: int, pad_id: int = 0) -> AlignModel:
    """CONCH's CoCa; ``decoder_layers=0`` leaves out the captioning decoder (then the
    published checkpoint's ``text_decoder.*`` keys are unexpected)."""
    visual = ConchImageTower(embed_dim=vision_width, depth=vision_depth, num_heads=vision_heads, mlp_ratio=4.0,
                             img_size=img_size, patch_size=patch_size, pool_dim=embed_dim, pool_heads=pool_heads,
                             caption_dim=text_width, caption_queries=caption_queries,
                             preprocess=get_tile_encoder_spec("conch").preprocess)
    text = CoCaTextTower(vocab_size=vocab_size, context_length=context_length, width=text_width, heads=text_heads,
                         layers=text_layers, embed_dim=embed_dim, pad_id=pad_id)
    decoder = (MultimodalDecoder(width=text_width, heads=text_heads, layers=decoder_layers,
                                 context_length=context_length, vocab_size=vocab_size) if decoder_layers else None)
    return AlignModel(visual=visual, text=text, text_decoder=decoder)
