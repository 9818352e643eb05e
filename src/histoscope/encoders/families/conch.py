"""CONCH's vision tower (Mahmood lab): the registry entry; the module is
:class:`~histoscope.encoders.conch_tower.ConchVisionTower`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoscope.encoders.pooling import MODEL_OUTPUT
from histoscope.encoders.registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, register_tile_encoder

if TYPE_CHECKING:
    from torch import nn

__all__ = ["conch"]

CONCH_KWARGS = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, img_size=448, patch_size=16,
                    pool_dim=512, pool_heads=8)


@register_tile_encoder(
    description="CONCH (Mahmood lab) vision tower: ViT-B/16 at 448 px + attentional pooler; "
                "pooled embedding before the contrastive projection",
    embed_dim=512,
    preprocess=Preprocess(resize=448, crop=448, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=512,
    hf_repo="MahmoodLab/CONCH", hf_filenames=("pytorch_model.bin",), gated=True, license="CC-BY-NC-ND-4.0",
    checkpoint_format="conch", homepage="https://github.com/mahmoodlab/CONCH",
)
def conch(**arch) -> nn.Module:
    from histoscope.encoders.conch_tower import ConchVisionTower

    return ConchVisionTower(**{**CONCH_KWARGS, **arch})
