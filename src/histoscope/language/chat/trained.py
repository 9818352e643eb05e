"""The run folder of ``histoscope train-chat``: the trained assistant and its tokenizer.

``OUT/model.pt`` holds plain data: the builder settings (``arch``), the template name,
the tile encoder for tile images, and the weights. The language model's weights are in
it when they cannot be found elsewhere (an LM built from a config, or trained in full);
an LM read from a local folder and trained with LoRA is stored as that folder plus the
adapters, merged into it on loading. ``OUT/tokenizer/`` is the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from histoscope.io.atomic import atomic_path
from histoscope.language.align.trained import save_tokenizer, tokenizer_path
from histoscope.io.checkpoint import compare_state_dict, read_checkpoint
from histoscope.language.chat.lora import apply_lora, lora_state, merge_lora
from histoscope.language.chat.model import ChatModel, build_chat_model
from histoscope.language.chat.tokenizer import ChatTokenizer

__all__ = ["MARKER", "chat_model_path", "chat_tokenizer_path", "load_chat_model", "save_chat_model",
           "save_chat_tokenizer"]

MARKER = "histoscope_chat_model"


def chat_model_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "model.pt"


def chat_tokenizer_path(run_dir: str | Path) -> Path:
    return tokenizer_path(run_dir)


def save_chat_tokenizer(tokenizer: ChatTokenizer, run_dir: str | Path) -> Path:
    """Write ``OUT/tokenizer/`` whole or not at all."""
    return save_tokenizer(tokenizer, run_dir)


def save_chat_model(path: str | Path, model: ChatModel, *, arch: dict[str, Any], template: str,
                    encoder: dict[str, Any] | None = None, lm_trained: bool = True,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` atomically. ``lm_trained`` False (an LM read from ``arch["lm_path"]``
    and never changed) leaves its weights out; LoRA adapters on such an LM are kept apart."""
    arch = dict(arch)
    lora = lora_state(model)
    keep_lm = arch.get("lm_path") is None or (lm_trained and lora is None)
    if keep_lm:
        merge_lora(model)
        lora = None
        arch["lm_config"] = model.base_lm.config.to_dict()
        arch["lm_path"] = None  # rebuilt from the config, the weights from this file
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if keep_lm or not k.startswith("lm.")}
    checkpoint = {MARKER: 1, "arch": arch, "template": template, "encoder": encoder, "state_dict": state,
                  "lora": None if lora is None else {"settings": lora[0], "state": lora[1]}, **(extra or {})}
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_chat_model(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[ChatModel, dict[str, Any]]:
    """``(model in eval mode, checkpoint metadata)`` from a ``model.pt`` that :func:`save_chat_model` wrote."""
    path = Path(path)
    checkpoint = read_checkpoint(path, kind="chat")
    arch = dict(checkpoint["arch"])
    state = checkpoint["state_dict"]
    with torch.device("cpu"):
        model = build_chat_model(**arch)
    if checkpoint.get("lora"):
        lora = checkpoint["lora"]
        apply_lora(model, **lora["settings"], state=lora["state"])
        merge_lora(model)
    lm_in_file = any(k.startswith("lm.") for k in state)
    missing, unexpected, mismatched = compare_state_dict(model, state)
    if not lm_in_file:
        missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: does not fit the assistant it describes (missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, misshapen {[k for k, *_ in mismatched][:8]}); was it written by "
                         "histoscope train-chat?")
    model.load_state_dict(state, strict=lm_in_file)
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "lora")}
    return model.to(device=device, dtype=dtype).eval(), meta
