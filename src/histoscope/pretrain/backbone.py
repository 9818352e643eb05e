"""A registry ViT as a pretraining backbone: class and patch tokens, with masked patches.

The tile encoder's own module (``spec.builder``, loaded strictly when weights are given)
is kept whole, so it is exported in the encoder's published key layout; pretraining
runs its timm ``VisionTransformer`` (the module itself, or its ``trunk`` as in CONCH)
token by token, as DINOv2's ``prepare_tokens_with_masks`` does: masked patch embeddings
are replaced by a learned mask token *before* the position embeddings are added.
Parameters of the encoder outside the ViT (CONCH's attentional pooler) are frozen.

Notation: B images, g x g patch grid, N = g * g patch tokens, C width.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["MaskedViT", "find_vit", "NotAViTError", "set_drop_path"]


class NotAViTError(ValueError):
    """The encoder has no timm VisionTransformer with a class token to pretrain."""


def find_vit(model: nn.Module, *, encoder: str = "encoder") -> tuple[str, VisionTransformer]:
    """``(attribute path, module)`` of the ViT inside an encoder's module ("" for the module itself)."""
    for path, module in (("", model), ("trunk", getattr(model, "trunk", None))):
        if isinstance(module, VisionTransformer):
            if module.cls_token is None:
                raise NotAViTError(f"tile encoder {encoder!r}: its ViT has no class token, which DINOv2 trains")
            return path, module
    raise NotAViTError(f"tile encoder {encoder!r} ({type(model).__name__}) is not a ViT; self-supervised "
                       "pretraining here trains timm ViTs (see `histoscope models`)")


def set_drop_path(blocks, rate: float) -> None:
    """The same stochastic-depth rate in every timm ``Block`` of ``blocks``."""
    for block in blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


class MaskedViT(nn.Module):
    """``forward(images (B, 3, H, W), masks (B, N) bool or None)`` -> ``{"cls": (B, C), "patch": (B, N, C)}``.

    Both token kinds are taken after the final norm (DINOv2's ``x_norm_clstoken`` and
    ``x_norm_patchtokens``); register tokens are dropped. Images of any size the patch
    grid divides are accepted (position embeddings are resampled).
    """

    def __init__(self, *, model: nn.Module, encoder: str = "encoder"):
        super().__init__()
        self.model = model
        self._vit_path, vit = find_vit(model, encoder=encoder)
        vit.dynamic_img_size = True  # global and local crops differ in size; changes no weights
        if hasattr(vit.patch_embed, "flatten"):
            vit.patch_embed.flatten = False
            vit.patch_embed.output_fmt = "NHWC"
            vit.patch_embed.dynamic_img_pad = False
        vit.patch_embed.strict_img_size = False
        for name, parameter in model.named_parameters():
            inside = not self._vit_path or name.startswith(f"{self._vit_path}.")
            parameter.requires_grad_(inside and parameter.requires_grad)
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))  # DINOv2 starts it at zero

    @property
    def vit(self) -> VisionTransformer:
        return self.model.get_submodule(self._vit_path) if self._vit_path else self.model

    @property
    def vit_prefix(self) -> str:
        """Parameter-name prefix of the ViT inside this module (``model.`` or ``model.trunk.``)."""
        return f"model.{self._vit_path}." if self._vit_path else "model."

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    def set_drop_path(self, rate: float) -> None:
        """The same stochastic-depth rate in every block (DINOv2's ``drop_path_uniform``)."""
        set_drop_path(self.vit.blocks, rate)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(images)  # (B, g, g, C)
        if masks is not None:
            token = self.mask_token.to(x.dtype).view(1, 1, 1, -1)
            x = torch.where(masks.view(*x.shape[:-1], 1), token, x)
        x = vit._pos_embed(x)  # (B, P + N, C): class (and register) tokens prepended, positions added
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return {"cls": x[:, 0], "patch": x[:, vit.num_prefix_tokens :]}
