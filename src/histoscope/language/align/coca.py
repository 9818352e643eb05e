"""CoCa's text side as CONCH builds it: a causal text tower with an appended class token,
and a multimodal text decoder that cross-attends to image tokens.

Parameter names are open_clip's (``token_embedding``, ``positional_embedding``,
``cls_emb``, ``transformer.resblocks.i``, ``ln_final``, ``text_projection``; the
decoder's ``resblocks.i``, ``cross_attn.i``), so CONCH's ``text.*`` and
``text_decoder.*`` tensors load unchanged.

Notation: B captions, L tokens, W width, E joint embedding dim, S image tokens,
V vocabulary, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histoscope.layers.residual_attention import ResidualAttentionBlock, causal_mask

__all__ = ["CoCaTextTower", "MultimodalDecoder", "cls_attention_mask"]


def cls_attention_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Additive (B, L+1, L+1) mask adding padding to the class token's row, as open_clip does.

    Only the last row (the appended class token) is masked. Its key ``k`` is visible if
    ``k == 0`` or token ``k − 1`` is not padding: open_clip pads the padding test by one
    column on the left, so the class token sees the first pad after the caption and
    not itself (unless the caption fills the context). CONCH was trained this way.
    """
    visible = F.pad(ids != pad_id, (1, 0), value=True)  # (B, L+1)
    mask = torch.zeros(ids.shape[0], ids.shape[1] + 1, ids.shape[1] + 1, device=ids.device)
    mask[:, -1].masked_fill_(~visible, float("-inf"))
    return mask


class _Transformer(nn.Module):
    """A stack of self-attention blocks (open_clip's ``Transformer``: ``resblocks.i``)."""

    def __init__(self, *, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(dim=width, num_heads=heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def _init_blocks(blocks, *, width: int, layers: int) -> None:
    # open_clip's TextTransformer.init_parameters
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class CoCaTextTower(nn.Module):
    """Token ids (B, L) -> (embedding (B, E), token states (B, L, W)).

    A causal transformer over the caption plus a learned class token appended at the
    end; the class token's state, layer-normalised and projected, is the caption's
    embedding. The token states (before ``ln_final``) feed the multimodal decoder.
    ``embed_cls``: the caller drops the tokenizer's last position (a placeholder) to
    make room for the class token, as CoCa's ``encode_text`` does.
    """

    embed_cls = True
    causal = True

    def __init__(self, *, vocab_size: int, context_length: int, width: int, heads: int, layers: int,
                 embed_dim: int, pad_id: int = 0):
        super().__init__()
        self.context_length = context_length
        self.heads = heads
        self.pad_id = pad_id
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.cls_emb = nn.Parameter(torch.empty(width))
        self.transformer = _Transformer(width=width, layers=layers, heads=heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.cls_emb, std=0.01)
        _init_blocks(self.transformer.resblocks, width=width, layers=layers)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = ids.shape
        if length + 1 > self.context_length:
            raise ValueError(f"{length} tokens plus the class token exceed the context length {self.context_length}")
        x = self.token_embedding(ids)  # (B, L, W)
        x = torch.cat([x, self.cls_emb.expand(batch, 1, -1)], dim=1)  # (B, L+1, W)
        mask = self.attn_mask[: length + 1, : length + 1] + cls_attention_mask(ids, self.pad_id)  # (B, L+1, L+1)
        x = x + self.positional_embedding[: length + 1]
        x = self.transformer(x, mask.repeat_interleave(self.heads, dim=0))
        pooled = self.ln_final(x[:, -1]) @ self.text_projection  # (B, E)
        return pooled, x[:, :-1]


class MultimodalDecoder(nn.Module):
    """CoCa's captioning decoder: text states (B, T, W) and image tokens (B, S, W) -> logits (B, T, V).

    Each layer is a causal self-attention block followed by a cross-attention block
    over the image tokens (open_clip's ``MultimodalTransformer``).
    """

    def __init__(self, *, width: int, heads: int, layers: int, context_length: int, vocab_size: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(dim=width, num_heads=heads) for _ in range(layers))
        self.cross_attn = nn.ModuleList(ResidualAttentionBlock(dim=width, num_heads=heads, cross_attention=True)
                                        for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        _init_blocks([*self.resblocks, *self.cross_attn], width=width, layers=layers)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``image_mask`` (B, S): True on real image tokens (None: all are)."""
        length = text_tokens.shape[1]
        mask = self.attn_mask[:length, :length]
        x = text_tokens
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = block(x, attn_mask=mask)
            x = cross(x, context=image_tokens, context_mask=image_mask)
        return self.ln_final(x) @ self.text_projection  # (B, T, V)
