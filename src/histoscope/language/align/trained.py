"""The run folder of ``histoscope train-align``: one trained model and its tokenizer.

``OUT/model.pt`` holds plain data -- the registry name, the builder keywords, the
tokenizer settings and the state dict -- so it loads with ``weights_only=True`` and
rebuilds without the files the run started from (a tile encoder's weights and a
Hugging Face text model live in the state dict; the text model's config in ``arch``).
``OUT/tokenizer/`` is the tokenizer, written by ``save_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscope.io.atomic import PARTIAL, atomic_path
from histoscope.io.checkpoint import read_checkpoint
from histoscope.language.align.registry import load_align_model, load_align_state
from histoscope.language.align.tokenizer import TextTokenizer

__all__ = ["MARKER", "TrainedAlignModel", "align_model_path", "load_align_run", "portable_arch", "save_align_model",
           "save_tokenizer", "tokenizer_path"]

MARKER = "histoscope_align_model"


def align_model_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "model.pt"


def tokenizer_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tokenizer"


def portable_arch(arch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``arch`` with what pointed outside the run replaced by what the state dict and config hold."""
    arch = dict(arch)
    if arch.get("image_encoder") is not None:
        arch["image_weights"] = "random"  # the encoder's weights are in the state dict
    if arch.get("text_model") == "hf":
        arch["text_config"] = model.text.model.config.to_dict()
        arch["text_path"] = None
    return arch


def save_tokenizer(tokenizer: TextTokenizer, run_dir: str | Path) -> Path:
    """Write ``OUT/tokenizer/`` whole or not at all."""
    final = tokenizer_path(run_dir)
    partial = final.with_name(f".{final.name}{PARTIAL}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def save_align_model(path: str | Path, *, model: nn.Module, name: str, arch: dict[str, Any],
                     tokenizer: TextTokenizer, extra: dict[str, Any] | None = None) -> Path:
    checkpoint = {
        MARKER: name,
        "arch": portable_arch(arch, model),
        "context_length": tokenizer.context_length,
        "reserve_cls": tokenizer.reserve_cls,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


@dataclass
class TrainedAlignModel:
    model: nn.Module  # AlignModel in eval mode
    tokenizer: TextTokenizer
    meta: dict[str, Any]  # everything in model.pt but the weights


def load_align_run(path: str | Path, *, device: str | torch.device = "cpu") -> TrainedAlignModel:
    """The model and tokenizer of a ``train-align`` run folder (or its ``model.pt``)."""
    path = Path(path)
    file = align_model_path(path) if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no trained model here; pass a histoscope train-align output folder "
                                "(a run writes model.pt when it finishes)")
    checkpoint = read_checkpoint(file, kind="align")
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = load_align_model(meta[MARKER], **meta["arch"])
    load_align_state(model, checkpoint["state_dict"], path=file, name=meta[MARKER])
    tokenizer = TextTokenizer.load(tokenizer_path(file.parent), context_length=meta["context_length"],
                                   reserve_cls=meta["reserve_cls"])
    return TrainedAlignModel(model.to(device).eval(), tokenizer, meta)
