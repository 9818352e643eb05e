"""ViT tile encoders published as plain timm state dicts and built with timm.

UNI, UNI2-h, Prov-GigaPath, Virchow, Virchow2, H-optimus-0 and H-optimus-1. Each
builder passes the authors' full timm kwargs (the registry names are only shells
for some of them, e.g. UNI2-h on ``vit_giant_patch14_224``); ``arch`` overrides them.
Builders import timm when called, so the registry lists these without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histoscope.encoders.pooling import CLS_MEAN_PATCH, MODEL_OUTPUT
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, register_tile_encoder

if TYPE_CHECKING:
    from torch import nn

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

_HOPTIMUS_KWARGS = dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False)


def _timm(model: str, kwargs: dict[str, Any], arch: dict[str, Any]) -> nn.Module:
    """timm's ``model`` with the authors' ``kwargs``, ``arch`` overriding them."""
    import timm

    return timm.create_model(model, pretrained=False, **{**kwargs, **arch})


def _virchow_kwargs() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked
    from torch import nn

    return dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)


_RESIZE_224 = Preprocess(resize=224, crop=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_RESIZE_224_BICUBIC = Preprocess(resize=224, crop=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_HOPTIMUS = Preprocess(resize=224, crop=224, interpolation="bilinear", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD)


@register_tile_encoder(
    description="UNI (Mahmood lab): ViT-L/16 DINOv2, Mass-100K; class token",
    embed_dim=1024, preprocess=_RESIZE_224, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=256,
    hf_repo="MahmoodLab/UNI", gated=True, license="CC-BY-NC-ND-4.0", checkpoint_format="timm",
    homepage="https://github.com/mahmoodlab/UNI",
)
def uni(**arch) -> nn.Module:
    kwargs = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return _timm("vit_large_patch16_224", kwargs, arch)


@register_tile_encoder(
    description="UNI2-h (Mahmood lab): ViT-H/14, 8 registers, SwiGLU; class token",
    embed_dim=1536, preprocess=_RESIZE_224, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=256,
    hf_repo="MahmoodLab/UNI2-h", gated=True, license="CC-BY-NC-ND-4.0", checkpoint_format="timm",
    homepage="https://github.com/mahmoodlab/UNI",
)
def uni2_h(**arch) -> nn.Module:
    from timm.layers import SwiGLUPacked
    from torch import nn

    kwargs = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                  mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
                  act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True)
    return _timm("vit_giant_patch14_224", kwargs, arch)


@register_tile_encoder(
    description="Prov-GigaPath tile encoder: ViT-g DINOv2 with 16-px patches; class token",
    embed_dim=1536,
    preprocess=Preprocess(resize=256, crop=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=256,
    hf_repo="prov-gigapath/prov-gigapath", gated=True, license="Apache-2.0", checkpoint_format="timm",
    homepage="https://github.com/prov-gigapath/prov-gigapath",
)
def gigapath(**arch) -> nn.Module:
    kwargs = dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                  mlp_ratio=5.33334, num_classes=0)
    return _timm("vit_giant_patch14_dinov2", kwargs, arch)


@register_tile_encoder(
    description="Virchow (Paige): ViT-H/14 SwiGLU; concat(class token, mean patch token)",
    embed_dim=2560, preprocess=_RESIZE_224_BICUBIC, pooling=CLS_MEAN_PATCH, native_mpp=0.5, native_tile=224,
    hf_repo="paige-ai/Virchow", gated=True, license="Apache-2.0 (with Paige additional terms)",
    checkpoint_format="timm", homepage="https://huggingface.co/paige-ai/Virchow",
)
def virchow(**arch) -> nn.Module:
    return _timm("vit_huge_patch14_224", _virchow_kwargs(), arch)


@register_tile_encoder(
    description="Virchow2 (Paige): ViT-H/14 SwiGLU, 4 registers, mixed magnification; "
                "concat(class token, mean patch token)",
    embed_dim=2560, preprocess=_RESIZE_224_BICUBIC, pooling=CLS_MEAN_PATCH, native_mpp=0.5, native_tile=224,
    hf_repo="paige-ai/Virchow2", gated=True, license="CC-BY-NC-ND-4.0", checkpoint_format="timm",
    homepage="https://huggingface.co/paige-ai/Virchow2",
)
def virchow2(**arch) -> nn.Module:
    return _timm("vit_huge_patch14_224", dict(_virchow_kwargs(), reg_tokens=4), arch)


@register_tile_encoder(
    description="H-optimus-0 (Bioptimus): ViT-g/14, 4 registers; class token",
    embed_dim=1536, preprocess=_HOPTIMUS, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=224,
    hf_repo="bioptimus/H-optimus-0", gated=True, license="Apache-2.0", checkpoint_format="timm",
    homepage="https://github.com/bioptimus/releases",
)
def hoptimus0(**arch) -> nn.Module:
    return _timm("vit_giant_patch14_reg4_dinov2", _HOPTIMUS_KWARGS, arch)


@register_tile_encoder(
    description="H-optimus-1 (Bioptimus): ViT-g/14, 4 registers, same architecture as H-optimus-0; class token",
    embed_dim=1536, preprocess=_HOPTIMUS, pooling=MODEL_OUTPUT, native_mpp=0.5, native_tile=224,
    hf_repo="bioptimus/H-optimus-1", gated=True, license="unverified (academic access terms)",
    checkpoint_format="timm", homepage="https://huggingface.co/bioptimus/H-optimus-1",
)
def hoptimus1(**arch) -> nn.Module:
    return _timm("vit_giant_patch14_reg4_dinov2", _HOPTIMUS_KWARGS, arch)
