"""CTransPath (Wang et al.): Swin-T with a convolutional patch stem.

The authors used a patched timm 0.5.4; current timm's Swin is NHWC and passes more
arguments to its patch-embedding layer, so :class:`ConvStem` here returns
``(B, H/4, W/4, C)``. The official ``ctranspath.pth`` (``{"model": state_dict}``, timm
0.5.4 layout) is converted by timm's own Swin checkpoint filter. The embedding is
the average of the final-norm tokens, i.e. the headless Swin output.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import to_2tuple
from torch import nn

from histoscope.encoders.pooling import MODEL_OUTPUT
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, register_tile_encoder

__all__ = ["ConvStem", "ctranspath"]

CTRANSPATH_KWARGS = dict(num_classes=0)  # swin_tiny_patch4_window7_224 defaults are the paper's Swin-T


class ConvStem(nn.Module):
    """Two stride-2 3x3 conv-BN-ReLU layers and a 1x1 projection: (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, *, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", device=None, dtype=None):
        super().__init__()
        if to_2tuple(patch_size) != (4, 4) or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8, "
                             f"got {patch_size} and {embed_dim}")
        if output_fmt != "NHWC":
            raise ValueError(f"ConvStem returns NHWC tokens, not {output_fmt}")
        dd = dict(device=device, dtype=dtype)
        self.img_size = to_2tuple(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(2 * width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, embed_dim, kernel_size=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)


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
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem,
                             **{**CTRANSPATH_KWARGS, **arch})
