"""Published checkpoint key layouts <-> the key names of the modules our builders return.

One converter per ``TileEncoderSpec.checkpoint_format``. A converter renames, fuses
or drops the keys of its layout and returns ``(state_dict, foreign)``: ``foreign``
lists keys that do not belong to the layout at all (reported as unexpected), so a
file in another layout fails loudly even when the architectures coincide (UNI and
Phikon-v2 are both ViT-L/16 with LayerScale).

:func:`export_checkpoint` goes the other way for the layouts a trained model can be
written in (``timm``, ``hf_vit``, ``hf_dinov2``, ``conch``), so a model pretrained
here loads through the same strict path as the authors' files.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from torch import nn

__all__ = ["CONVERTERS", "EXPORTERS", "convert_checkpoint", "export_checkpoint"]

StateDict = dict[str, torch.Tensor]
Converted = tuple[StateDict, list[str]]  # (converted state dict, keys foreign to the layout)

# HF transformers ViTModel (Phikon) / Dinov2Model (Phikon-v2) -> timm VisionTransformer
_HF_SHARED_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^layernorm\.", "norm."),
)
_HF_VIT_RENAMES = _HF_SHARED_RENAMES + (
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
)
_HF_DINOV2_RENAMES = _HF_SHARED_RENAMES + (  # with LayerScale
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
)
_HF_LAYOUT = re.compile(r"^(embeddings|encoder\.layer\.\d+|layernorm|pooler)\.")
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
# pooler: ViTModel's optional tanh head, unused by the published embedding (add_pooling_layer=False);
# mask_token: Dinov2's masked-image-modelling token, unused at inference
_HF_VIT_DROP = re.compile(r"^pooler\.")
_HF_DINOV2_DROP = re.compile(r"^embeddings\.mask_token$")

# CONCH's CoCa checkpoint: keep the vision tower, drop the text side and the captioning branch
_CONCH_DROP = ("text.", "text_decoder.", "visual.attn_pool_caption.", "visual.ln_caption.")
_CONCH_DROP_EXACT = ("logit_scale",)

# torchvision ResNet-50 -> CLAM's truncated ResNet-50 (conv1 .. layer3)
_RESNET_TRUNC_DROP = ("layer4.", "fc.")


def _convert_hf(sd: StateDict, renames, drop: re.Pattern, prefix: str) -> Converted:
    out: StateDict = {}
    foreign = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix(prefix)
        if not _HF_LAYOUT.match(key):
            foreign.append(key)
            continue
        if drop.match(key):
            continue
        if m := _HF_QKV.match(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in renames:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    for (layer, param), parts in qkv.items():
        if parts.keys() == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # incomplete: keep the original names so the strict load reports them
            out.update({f"encoder.layer.{layer}.attention.attention.{p}.{param}": v for p, v in parts.items()})
    return out, foreign


def _hf_vit(sd: StateDict, model: nn.Module) -> Converted:
    return _convert_hf(sd, _HF_VIT_RENAMES, _HF_VIT_DROP, prefix="vit.")


def _hf_dinov2(sd: StateDict, model: nn.Module) -> Converted:
    return _convert_hf(sd, _HF_DINOV2_RENAMES, _HF_DINOV2_DROP, prefix="dinov2.")


def _timm(sd: StateDict, model: nn.Module) -> Converted:
    # A headless encoder ignores the classifier of a classification checkpoint, as timm's own loader does.
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not classifier or getattr(model, "num_classes", None) != 0:
        return sd, []
    heads = tuple(f"{n}." for n in ((classifier,) if isinstance(classifier, str) else classifier))
    own = model.state_dict().keys()
    return {k: v for k, v in sd.items() if k in own or not k.startswith(heads)}, []


def _ctranspath(sd: StateDict, model: nn.Module) -> Converted:
    # timm 0.5.4 Swin layout: patch merging at the end of a stage, persistent index/mask buffers
    return swin_checkpoint_filter_fn(sd, model), []


def _conch(sd: StateDict, model: nn.Module) -> Converted:
    kept = {k: v for k, v in sd.items() if k not in _CONCH_DROP_EXACT and not k.startswith(_CONCH_DROP)}
    foreign = [k for k in kept if not k.startswith("visual.")]
    return {k.removeprefix("visual."): v for k, v in kept.items() if k.startswith("visual.")}, foreign


def _torchvision(sd: StateDict, model: nn.Module) -> Converted:
    return {k: v for k, v in sd.items() if not k.startswith(_RESNET_TRUNC_DROP)}, []


CONVERTERS: dict[str, Callable[[StateDict, nn.Module], Converted]] = {
    "timm": _timm,
    "hf_vit": _hf_vit,
    "hf_dinov2": _hf_dinov2,
    "ctranspath": _ctranspath,
    "conch": _conch,
    "torchvision": _torchvision,
}


def convert_checkpoint(checkpoint_format: str, state_dict: StateDict, model: nn.Module) -> Converted:
    """Rename a state dict published in ``checkpoint_format`` to ``model``'s key names.

    Returns the converted state dict and the keys that are foreign to that layout.
    """
    return CONVERTERS[checkpoint_format](state_dict, model)


# timm VisionTransformer -> HF ViTModel / Dinov2Model: the inverse of the renames above
_TO_HF_SHARED = (
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^norm\.", "layernorm."),
)
_TO_HF_VIT = _TO_HF_SHARED + (
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
)
_TO_HF_DINOV2 = _TO_HF_SHARED + (
    (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layer.\1.mlp.fc\2."),
)
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _to_hf(sd: StateDict, renames) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        if m := _TIMM_QKV.match(key):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = part.contiguous()
            continue
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"{key!r} has no place in the Hugging Face layout")
    return out


EXPORTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": dict,
    "hf_vit": lambda sd: _to_hf(sd, _TO_HF_VIT),
    "hf_dinov2": lambda sd: _to_hf(sd, _TO_HF_DINOV2),
    "conch": lambda sd: {f"visual.{k}": v for k, v in sd.items()},
}


def export_checkpoint(checkpoint_format: str, state_dict: StateDict) -> StateDict:
    """``state_dict`` of one of our encoder modules, renamed to the published ``checkpoint_format``.

    ``convert_checkpoint(checkpoint_format, export_checkpoint(checkpoint_format, sd), model)``
    gives ``sd`` back.
    """
    if checkpoint_format not in EXPORTERS:
        raise ValueError(f"cannot write checkpoints in the {checkpoint_format!r} layout; "
                         f"writable layouts: {', '.join(EXPORTERS)}")
    return EXPORTERS[checkpoint_format](state_dict)
