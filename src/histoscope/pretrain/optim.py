"""AdamW parameter groups with layer-wise learning-rate decay, as ``dinov2/utils/param_groups.py``.

A parameter of block i of an n-block ViT gets ``lr_multiplier = decay ** (n - i)``; the
embeddings (patch and position embeddings, class, register and mask tokens) get
``decay ** (n + 1)``, everything else (final norm, heads) 1; the patch embedding's is
further multiplied by ``patch_embed_lr_mult``. Biases, norms and LayerScale gammas get no
weight decay. ``is_last_layer`` marks the heads' prototype layers, whose learning rate is
held at 0 for the first epochs. Parameters with equal multipliers are fused into one
group. timm's names are used (``reg_token`` is DINOv2's ``register_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["apply_schedules", "clip_grad_norms", "layer_id", "param_groups"]

_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token", "register_tokens")


def layer_id(name: str, *, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, ``n_blocks + 1`` for the rest (of a backbone)."""
    if any(key in name for key in _EMBEDDINGS):
        return 0
    if "blocks." in name and "residual." not in name:
        after = name[name.find("blocks.") :].split(".")
        return int(after[1]) + 1
    return n_blocks + 1


def param_groups(module: nn.Module, *, n_blocks: int, lr_decay_rate: float = 1.0,
                 patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Fused groups ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer"}`` of ``module``'s
    trainable parameters; ``n_blocks=0`` for modules that are not a backbone (all multipliers 1)."""
    fused: dict[tuple, dict] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id(name, n_blocks=n_blocks)) if n_blocks else 1.0
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        wd_multiplier = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_multiplier, wd_multiplier, "last_layer" in name)
        group = fused.setdefault(key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                       "is_last_layer": key[2]})
        group["params"].append(parameter)
    return list(fused.values())


def apply_schedules(optimizer: torch.optim.Optimizer, *, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's learning rate and weight decay for this iteration."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


def clip_grad_norms(modules: Iterable[nn.Module], max_norm: float | None) -> dict[str, float]:
    """Clip each module's gradients separately (as DINOv2 clips each student part); their norms."""
    norms = {}
    for index, module in enumerate(modules):
        parameters = [p for p in module.parameters() if p.grad is not None]
        if parameters and max_norm:
            norms[str(index)] = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    return norms
