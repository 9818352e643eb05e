"""CLAM's truncated ResNet-50: ImageNet ResNet-50 up to layer3, global average pooled (1024-d).

Built like current CLAM (timm ``features_only`` up to layer3). Published weights are
the torchvision ImageNet ResNet-50 (timm ``resnet50.tv_in1k``); loading drops exactly
``layer4.*`` and ``fc.*``, which the truncated model does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histoscope.encoders.pooling import FEATURE_MAP_MEAN
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, register_tile_encoder

if TYPE_CHECKING:
    from torch import nn

RESNET50_TRUNC_KWARGS = dict(features_only=True, out_indices=(3,))  # index 3 = layer3 (stride 16)


@register_tile_encoder(
    description="ResNet-50 (ImageNet, torchvision weights) truncated after layer3, as in CLAM; average pooled",
    embed_dim=1024,
    preprocess=Preprocess(resize=224, crop=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    pooling=FEATURE_MAP_MEAN, native_mpp=0.5, native_tile=256,
    hf_repo="timm/resnet50.tv_in1k", gated=False, license="BSD-3-Clause", checkpoint_format="torchvision",
    homepage="https://github.com/mahmoodlab/CLAM",
)
def resnet50_trunc(**arch) -> nn.Module:
    import timm

    return timm.create_model("resnet50", pretrained=False, **{**RESNET50_TRUNC_KWARGS, **arch})
