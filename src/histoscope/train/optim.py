"""Which parameters train, and at which learning rate.

Without ``layer_decay`` every trainable parameter is in one AdamW group at ``lr`` and
``weight_decay``. With it, as BEiT and Prov-GigaPath's fine-tuning (``param_groups_lrd``)
do, a parameter at depth ``i`` of a model whose top is at depth ``L`` (see
:meth:`~histoscope.slide.base.SlideModel.layer_ids`) trains at ``lr · layer_decay^(L − i)``,
and 1-D parameters (biases, norms) get no weight decay. Frozen parameters
(``requires_grad=False``) are in no group, so the optimizer never touches them.
"""

from __future__ import annotations

from typing import Any

from histoscope.slide import SlideModel, SlideModelSpec

__all__ = ["param_groups", "freeze_encoder"]


def freeze_encoder(model: SlideModel, spec: SlideModelSpec) -> None:
    """Only the head (``spec.head``) keeps training."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(spec.is_head(name))


def param_groups(model: SlideModel, *, lr: float, weight_decay: float,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of named parameters; layer-decayed groups also carry ``layer``."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter to train (all frozen)")
    if layer_decay is None:
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
    layers = model.layer_ids()
    if layers is None:
        raise ValueError(f"layer_decay needs a model with a stack of layers; {type(model).__name__} has none "
                         "(remove layer_decay from the recipe)")
    top = max(layers.values())
    groups: dict[tuple[int, float], dict[str, Any]] = {}
    for name, parameter in trainable:
        layer = layers[name]
        decay = 0.0 if parameter.ndim == 1 else weight_decay
        group = groups.setdefault((layer, decay), {"params": [], "lr": lr * layer_decay ** (top - layer),
                                                   "weight_decay": decay, "layer": layer})
        group["params"].append((name, parameter))
    return [groups[key] for key in sorted(groups)]
