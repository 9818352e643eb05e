"""HistoGPT's Perceiver resampler as a slide model (its stage-1, image-only form).

Notation: B slides, N tiles, D tile dim, L latents, E = ``dim``, C outputs.

``resampler`` is :class:`~histoscope.layers.perceiver.PerceiverResampler` with
HistoGPT's defaults (768 → 1536, 6 layers, 640 latents, 16 heads of 96); its keys are
HistoGPT's ``histogpt.perceiver_resampler.*`` with that prefix replaced by
``resampler.``. Padded tiles are removed from the keys of every attention layer.

The head is our choice: HistoGPT pre-trains the vision module with a MIL objective
before training the language side (paper, Fig. 2b), but its repository does not
contain the head used for that stage (spec §5.4: unverified). Here the slide
embedding is the mean of the L output latents and ``head`` is a Linear on it; the
tile scores are the attention the latents pay to each tile in the last layer,
averaged over latents and heads (the share going to the latents themselves is left
out, so a slide's scores sum to less than 1).

Init follows PyTorch's defaults and ``randn`` latents (flamingo-pytorch); HistoGPT's
``post_init`` probably re-initialises the Linears to N(0, 0.02) (unverified).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from histoscope.layers.perceiver import PerceiverResampler
from histoscope.slide.base import SlideModel, SlideOutput, default_mask

__all__ = ["PerceiverMIL", "histogpt_resampler_state_dict"]

_HISTOGPT_PREFIX = "histogpt.perceiver_resampler."


class PerceiverMIL(SlideModel):
    """Perceiver resampler → mean of latents → Linear.

    Parameters
    ----------
    in_dim : int
        D.
    num_outputs : int
        C; 0 builds no head.
    dim, depth, num_latents, dim_head, heads, ff_mult
        :class:`~histoscope.layers.perceiver.PerceiverResampler` settings.
    """

    def __init__(self, *, in_dim: int, num_outputs: int, dim: int, depth: int, num_latents: int, dim_head: int,
                 heads: int, ff_mult: int):
        super().__init__()
        self.embed_dim = dim
        self.num_outputs = num_outputs
        self.resampler = PerceiverResampler(in_dim=in_dim, dim=dim, depth=depth, num_latents=num_latents,
                                            dim_head=dim_head, heads=heads, ff_mult=ff_mult)
        self.head = nn.Linear(dim, num_outputs) if num_outputs else None

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        """``extras["latents"]``: the resampler output ``(B, L, E)`` (what HistoGPT's
        language model cross-attends to)."""
        mask = default_mask(features, mask)  # (B, N)
        features = features.masked_fill(~mask.unsqueeze(-1), 0)  # NaN padding would leak through 0 · v
        latents, attn = self.resampler(features, mask, return_attention=True)  # (B, L, E), (B, h, L, N + L)
        embedding = latents.mean(1)  # (B, E)
        scores = attn[..., :features.shape[1]].mean((1, 2))  # (B, N), 0 at padding
        logits = self.head(embedding) if self.head is not None else None
        return SlideOutput(embedding=embedding, logits=logits, scores=scores, extras={"latents": latents})


def histogpt_resampler_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The resampler of a HistoGPT checkpoint (raw state_dict) → ``resampler.*`` keys.

    Only the resampler is taken (the exit gate and language model are not part of this
    slide model), so load it into a model built with ``num_outputs=0``.
    """
    state = {"resampler." + key[len(_HISTOGPT_PREFIX):]: value for key, value in checkpoint.items()
             if key.startswith(_HISTOGPT_PREFIX)}
    if not state:
        raise KeyError(f"no {_HISTOGPT_PREFIX}* keys in the checkpoint; is it a HistoGPT checkpoint?")
    return state
