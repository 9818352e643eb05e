"""Owkin's Phikon (HF ``ViTModel``) and Phikon-v2 (HF ``Dinov2Model``), rebuilt as timm ViTs.

The published checkpoints use transformers key names; ``convert.py`` maps them to
timm's (fusing query/key/value into ``qkv``). The embedding is
``last_hidden_state[:, 0]``: the class token after the final layer norm, which is
what a headless timm ViT returns. LayerNorm eps must follow the HF configs: 1e-12
for ViT (transformers' default), 1e-6 for DINOv2.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from histoscope.encoders.pooling import MODEL_OUTPUT
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, register_tile_encoder

if TYPE_CHECKING:
    from torch import nn

_RESIZE_224 = Preprocess(resize=224, crop=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_tile_encoder(
    description="Phikon (Owkin): ViT-B/16 iBOT on 40M TCGA tiles; class token",
    embed_dim=768, preprocess=_RESIZE_224, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=224,
    hf_repo="owkin/phikon", gated=False, license="Owkin non-commercial", checkpoint_format="hf_vit",
    homepage="https://github.com/owkin/HistoSSLscaling",
)
def phikon(**arch) -> nn.Module:
    import timm
    from torch import nn

    kwargs = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, qkv_bias=True, num_classes=0,
                  norm_layer=partial(nn.LayerNorm, eps=1e-12))
    return timm.create_model("vit_base_patch16_224", pretrained=False, **{**kwargs, **arch})


@register_tile_encoder(
    description="Phikon-v2 (Owkin): ViT-L/16 DINOv2 on PANCAN-XL; class token",
    embed_dim=1024, preprocess=_RESIZE_224, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=224,
    hf_repo="owkin/phikon-v2", hf_filenames=("model.safetensors",), gated=False,
    license="Owkin non-commercial", checkpoint_format="hf_dinov2",
    homepage="https://huggingface.co/owkin/phikon-v2",
)
def phikon_v2(**arch) -> nn.Module:
    import timm
    from torch import nn

    kwargs = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, qkv_bias=True, init_values=1.0,
                  num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return timm.create_model("vit_large_patch16_224", pretrained=False, **{**kwargs, **arch})
