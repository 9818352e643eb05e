"""CTransPath (Wang et al.): Swin-T with a convolutional patch stem.

The authors used a patched timm 0.5.4; current timm's Swin is NHWC and passes more
arguments to its patch-embedding layer, so :class:`~histoscope.encoders.layers.ConvStem` returns
``(B, H/4, W/4, C)``. The official ``ctranspath.pth`` (``{"model": state_dict}``, timm
0.5.4 layout) is converted by timm's own Swin checkpoint filter. The embedding is
the average of the final-norm tokens, i.e. the headless Swin output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoscope.encoders.pooling import MODEL_OUTPUT
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, register_tile_encoder

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ctranspath"]

CTRANSPATH_KWARGS = dict(num_classes=0)  # swin_tiny_patch4_window7_224 defaults are the paper's Swin-T


@register_tile_encoder(
    description="CTransPath: Swin-T with a convolutional stem, SRCL on TCGA+PAIP; mean of final tokens",
    embed_dim=768,
    preprocess=Preprocess(resize=224, crop=None, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    pooling=MODEL_OUTPUT, native_mpp=1.0, native_tile=224,
    hf_repo=None, hf_filenames=("ctranspath.pth",), gated=False,
    license="GPL-3.0 (non-commercial academic use per the authors)", checkpoint_format="ctranspath",
    unwrap=("model",), homepage="https://github.com/Xiyue-Wang/TransPath",
)
def ctranspath(**arch) -> nn.Module:
    import timm

    from histoscope.encoders.layers import ConvStem

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem,
                             **{**CTRANSPATH_KWARGS, **arch})
