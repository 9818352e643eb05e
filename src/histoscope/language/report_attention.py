"""Where a report model looked: each token's attention over a slide's tiles.

HistoGPT's words never attend to tiles directly: text attends to the resampler's latents
(the gated cross-attention blocks), and the latents attend to the tiles (the resampler).
The product of the two — a token's cross-attention over the latents, averaged over heads
and layers, times each latent's attention over the tiles in the resampler's last layer,
averaged over heads — says how much of what a token read came from each tile (attention
rollout over the two hops; the share latents pay to themselves is left out, so a row
sums to at most 1).

Notation: T tokens, L latents, N tiles, h heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["token_tile_attention", "word_spans"]


@torch.no_grad()
def token_tile_attention(model, input_ids: Tensor, features: Tensor) -> Tensor:
    """``input_ids (1, T)``, one slide's ``features (1, N, D)`` → ``(T, N)``: row t is the
    attention over the tiles of the model reading token t (predicting token t + 1)."""
    if input_ids.shape[0] != 1 or features.shape[0] != 1:
        raise ValueError("token_tile_attention takes one sequence (1, T) and one slide (1, N, D)")
    parameter = model.exit_gate.weight
    features = features.to(device=parameter.device, dtype=parameter.dtype)
    latents, attention = model.resampler(features, return_attention=True)  # (1, L, M), (1, h, L, N + L)
    to_tiles = attention[0, :, :, :features.shape[1]].float().mean(0)  # (L, N)
    kv = model.media_kv(model.exit_gate(latents))
    weights: list[Tensor] = []

    def keep_weights(module, args, output):
        x, (k, _) = args
        q = module._split_heads(module.to_q(module.norm(x)))  # (1, h, T, d)
        weights.append(((q @ k.transpose(-1, -2)) * module.scale).float().softmax(-1)[0].mean(0))  # (T, L)

    hooks = [layer.block.attn.register_forward_hook(keep_weights) for layer in model.fusion_layers]
    try:
        with model.conditioned_on(kv):
            model.lm(input_ids=input_ids.to(parameter.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(weights).mean(0) @ to_tiles  # (T, N)


def word_spans(tokenizer, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Group token ids into words: ``[(word, [positions in ids])]``; a token starts a word
    when its text begins with a space (or it is the first), as decoding shows it."""
    spans: list[tuple[str, list[int]]] = []
    previous = ""
    for position in range(len(ids)):
        text = tokenizer.decode(list(ids[:position + 1]), skip_special_tokens=True)
        piece, previous = text[len(previous):], text
        if not piece:
            continue
        if not spans or piece[0].isspace():
            spans.append((piece.strip(), [position]))
        else:
            spans[-1] = (spans[-1][0] + piece, spans[-1][1] + [position])
    return [(word, positions) for word, positions in spans if word]
