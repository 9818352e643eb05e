"""Specs made on demand for any timm model (``timm:<name>``) or timm Hub repo (``hf-hub:<org>/<repo>``).

Preprocessing comes from the model's timm pretrained config, as timm's own eval
transform computes it: resize the shortest edge to ``floor(size / crop_pct)``,
centre-crop ``size``. For ``hf-hub:`` the repo's ``config.json`` supplies the
architecture, ``model_args`` (explicit ``arch`` overrides win, as in timm) and the
pretrained config.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from histoscope.encoders.errors import UnknownTileEncoderError
from histoscope.encoders.pooling import MODEL_OUTPUT
from histoscope.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess, TileEncoderSpec

__all__ = ["generic_spec", "hf_hub_spec", "preprocess_from_timm_cfg", "timm_spec"]

_DEFAULT_CROP_PCT = 0.875  # timm's default when a pretrained config has none
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub loader tries


def generic_spec(name: str, *, local_dir: str | Path | None = None) -> TileEncoderSpec:
    """Spec for ``timm:<model>`` or ``hf-hub:<org>/<repo>`` (``hf_hub:`` is accepted as an alias)."""
    source, _, target = name.partition(":")
    if source == "timm":
        return timm_spec(target)
    return hf_hub_spec(target, local_dir=local_dir)


def preprocess_from_timm_cfg(cfg: Mapping[str, Any]) -> Preprocess:
    """timm's eval preprocessing for a pretrained config (``input_size``, ``crop_pct``, ...)."""
    _, height, width = cfg.get("input_size", (3, 224, 224))
    if height != width:
        raise ValueError(f"non-square input_size {height}x{width} is not supported for tile encoders")
    if cfg.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {cfg['crop_mode']!r} is not supported (only 'center')")
    crop_pct = cfg.get("crop_pct") or _DEFAULT_CROP_PCT
    return Preprocess(
        resize=math.floor(height / crop_pct), crop=height, interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
    )


def _create(architecture: str, defaults: Mapping[str, Any], **arch) -> nn.Module:
    return timm.create_model(architecture, pretrained=False, **{**defaults, "num_classes": 0, **arch})


def _num_features(builder) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return builder().num_features


def timm_spec(model_name: str) -> TileEncoderSpec:
    """Spec for a timm model name (optionally with a ``.tag``), headless."""
    architecture = model_name.partition(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UnknownTileEncoderError(f"timm has no model named {architecture!r}.{hint}")
    cfg = timm.models.get_pretrained_cfg(model_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    builder = partial(_create, model_name, {})
    return TileEncoderSpec(
        name=f"timm:{model_name}", description=f"timm model {model_name} (headless)",
        builder=builder, embed_dim=_num_features(builder), preprocess=preprocess_from_timm_cfg(cfg),
        pooling=MODEL_OUTPUT, native_mpp=None, native_tile=cfg.get("input_size", (3, 224, 224))[-1],
        hf_repo=cfg.get("hf_hub_id"),
        hf_filenames=(cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _HUB_FILENAMES,
        license=cfg.get("license") or "unknown", checkpoint_format="timm",
    )


def read_hub_config(repo: str, *, local_dir: str | Path | None = None) -> dict[str, Any]:
    """``config.json`` of a timm Hub repo, from ``local_dir`` if it has one, else via huggingface_hub."""
    from histoscope.encoders.weights import download_from_hub

    path = Path(local_dir) / "config.json" if local_dir is not None else None
    if path is None or not path.is_file():
        path = download_from_hub(repo, ("config.json",), encoder=f"hf-hub:{repo}", gated=False)
    return json.loads(path.read_text())


def hf_hub_spec(repo: str, *, local_dir: str | Path | None = None) -> TileEncoderSpec:
    """Spec for a timm-format Hub repo described by its ``config.json``."""
    config = read_hub_config(repo, local_dir=local_dir)
    if "pretrained_cfg" in config:
        cfg = dict(config["pretrained_cfg"])
        architecture = config["architecture"]
    else:  # legacy flat config: the whole file is the pretrained config
        cfg = dict(config)
        architecture = cfg.pop("architecture")
    model_args = dict(config.get("model_args", {}))
    if "img_size" in model_args:
        size = model_args["img_size"]
        cfg["input_size"] = (3, size, size) if isinstance(size, int) else (3, *size)
    elif cfg.get("fixed_input_size"):
        model_args["img_size"] = cfg.get("input_size", (3, 224, 224))[-1]
    builder = partial(_create, architecture, model_args)
    return TileEncoderSpec(
        name=f"hf-hub:{repo}", description=f"timm {architecture} from Hugging Face repo {repo} (headless)",
        builder=builder, embed_dim=_num_features(builder), preprocess=preprocess_from_timm_cfg(cfg),
        pooling=MODEL_OUTPUT, native_mpp=None, native_tile=cfg.get("input_size", (3, 224, 224))[-1],
        hf_repo=repo, hf_filenames=(cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _HUB_FILENAMES,
        license=cfg.get("license") or "unknown", checkpoint_format="timm",
    )
