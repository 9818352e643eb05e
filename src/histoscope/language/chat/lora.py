"""LoRA on the assistant's language model, through ``peft``: attach, read out, merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["apply_lora", "lora_state", "merge_lora", "save_adapter"]


def _peft():
    try:
        import peft
    except ImportError:  # a ValueError: the command line reports it as one line naming the fix
        raise ValueError("LoRA (stage2.lm=lora) needs the peft package: pip install 'histoscope[chat]' "
                         "(or pip install peft), or train the LM in full with stage2.lm=full") from None
    return peft


def apply_lora(model, *, r: int, alpha: float, dropout: float, targets: Sequence[str],
               state: dict[str, Tensor] | None = None) -> None:
    """Wrap ``model.lm`` with LoRA adapters on the ``targets`` modules (rank ``r``, scale
    ``alpha / r``); only the adapters are trainable afterwards. ``state`` loads saved ones."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             task_type="CAUSAL_LM")
    model.lm = peft.get_peft_model(model.lm, config)
    if state is not None:
        result = peft.set_peft_model_state_dict(model.lm, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"LoRA adapter weights do not fit the model: unexpected {', '.join(unexpected[:8])}")


def lora_state(model) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(settings, adapter weights)`` of a LoRA-wrapped ``model.lm``, else None."""
    if not hasattr(model.lm, "peft_config"):
        return None
    peft = _peft()
    config = model.lm.peft_config["default"]
    settings = {"r": int(config.r), "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout),
                "targets": sorted(config.target_modules)}
    state = {k: v.detach().cpu().clone() for k, v in peft.get_peft_model_state_dict(model.lm).items()}
    return settings, state


def merge_lora(model) -> None:
    """Fold the adapters into the LM's weights (``W + B·A·alpha/r``) and drop the wrapper."""
    if hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()


def save_adapter(model, folder: str | Path) -> Path:
    """The adapters in ``peft``'s own format (``adapter_config.json`` + ``adapter_model.safetensors``):
    ``peft.PeftModel.from_pretrained(base_lm, folder)`` loads them onto the base LM."""
    model.lm.save_pretrained(str(folder))
    return Path(folder)
