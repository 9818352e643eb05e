"""The registered image–text models: CONCH as published, and ``clip``, composed from any towers.

An entry is a builder plus data: the published architecture (``defaults``, the only
place those values are written), a tiny variant for tests and where the weights come
from. Builders import their modules only when called, so this catalogue, and
``histoscope models``, never import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from histoscope.language.align.registry import register_align_model

__all__ = ["CONCH_ARCH", "CONCH_TINY"]

# conch_ViT-B-16.json: embed_dim 512, vision 768 wide x 12 at 448 px, text and decoder 768 wide x 12
CONCH_ARCH = dict(embed_dim=512, vision_width=768, vision_depth=12, vision_heads=12, img_size=448, patch_size=16,
                  pool_heads=8, caption_queries=256, vocab_size=32007, context_length=128, text_width=768,
                  text_heads=12, text_layers=12, decoder_layers=12, pad_id=0)
CONCH_TINY = dict(embed_dim=16, vision_width=32, vision_depth=2, vision_heads=2, img_size=32, patch_size=16,
                  pool_heads=2, caption_queries=4, vocab_size=64, context_length=16, text_width=32, text_heads=2,
                  text_layers=2, decoder_layers=2)
_CLIP_DEFAULTS = dict(embed_dim=512, context_length=77, text_width=512, text_heads=8, text_layers=12,
                      decoder_layers=0)
_CLIP_TINY = dict(embed_dim=32, context_length=32, text_width=32, text_heads=2, text_layers=2)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``histoscope.language.align.<module>.<name>``, imported on first call (``.resolve()`` returns it)."""

    def resolve() -> Callable[..., Any]:
        return getattr(importlib.import_module(f"histoscope.language.align.{module}"), name)

    def call(*args: Any, **kwargs: Any) -> Any:
        return resolve()(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.resolve = resolve
    return call


register_align_model(
    "conch", description="CONCH (Mahmood lab): CoCa, ViT-B/16 at 448 px + 12-layer text tower and decoder",
    defaults=CONCH_ARCH, tiny=CONCH_TINY, hf_repo="MahmoodLab/CONCH", hf_filename="pytorch_model.bin", gated=True,
    license="CC-BY-NC-ND-4.0", homepage="https://github.com/mahmoodlab/CONCH")(_lazy("conch", "conch"))
register_align_model(
    "clip", description="CLIP/CoCa from any tile encoder or features file and a CoCa or Hugging Face text tower",
    defaults=_CLIP_DEFAULTS, tiny=_CLIP_TINY, license="Apache-2.0")(_lazy("clip", "clip"))
