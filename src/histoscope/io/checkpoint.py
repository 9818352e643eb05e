"""The one reader of checkpoint files, for every model kind and stage.

``read_checkpoint(path)`` returns what a ``.pt``/``.pth``/``.bin`` (``torch.save``)
or ``.safetensors`` file holds, loading tensors and plain containers only
(``torch.load(weights_only=True)``; ``argparse.Namespace`` is allowed too, because
DINO-style training checkpoints pickle their arguments). Whatever goes wrong is a
:class:`CheckpointError` naming the file, saying what it found and what to do:
an empty or truncated file, a file that is no checkpoint at all, pickled Python
objects that cannot be loaded safely, or a checkpoint of another kind than the
caller needs (``kind=``).

Kinds: histoscope writes three files of its own, and everything else is weights:

- ``"trained"``: a model trained by ``histoscope train`` (``fold_k/checkpoint.pt``,
  marked by its ``histoscope_model`` key);
- ``"train_state"``: the resumable state of an unfinished fold (``fold_k/train_state.pt``);
- ``"align"``: an image–text model trained by ``histoscope train-align`` (``OUT/model.pt``,
  marked by its ``histoscope_align_model`` key);
- ``"chat"``: an assistant trained by ``histoscope train-chat`` (``OUT/model.pt``, marked
  by its ``histoscope_chat_model`` key);
- ``"weights"``: a state dict, bare or wrapped (``{"model": …}``, DINO's
  ``{"teacher": …}``), as published or as another code base saved it.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a file is read: error classes and kinds stay cheap to import
    import torch
    from torch import nn

__all__ = ["CheckpointError", "read_checkpoint", "checkpoint_kind", "compare_state_dict", "KINDS"]

KINDS = {
    "trained": "a model trained by histoscope train (fold_k/checkpoint.pt)",
    "train_state": "the training state of an unfinished fold (fold_k/train_state.pt)",
    "align": "an image–text model trained by histoscope train-align (OUT/model.pt)",
    "chat": "an assistant trained by histoscope train-chat (OUT/model.pt)",
    "weights": "model weights (a state dict)",
}
_ZIP = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE = b"\x80"  # the legacy torch.save format starts with a pickle protocol opcode
_SHOWN = 8  # keys listed in a message


class CheckpointError(ValueError):
    """A file cannot be read as a checkpoint, or holds another kind than the caller needs."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def checkpoint_kind(obj: Any) -> str:
    """Which of :data:`KINDS` a loaded checkpoint is."""
    if isinstance(obj, Mapping):
        if "histoscope_model" in obj:
            return "trained"
        if "histoscope_align_model" in obj:
            return "align"
        if "histoscope_chat_model" in obj:
            return "chat"
        if {"model", "optimizer", "scheduler", "early"} <= set(obj):
            return "train_state"
    return "weights"


def read_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> Any:
    """The object stored in a checkpoint file, on the CPU.

    Parameters
    ----------
    path : path
        A ``torch.save`` file (zip or legacy format) or a ``.safetensors`` file.
    kind : str or tuple of str, optional
        The :data:`KINDS` the caller accepts; a file of another kind raises
        :class:`CheckpointError` saying what it holds instead.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        The file is empty, truncated or damaged, not a checkpoint, holds objects
        that cannot be loaded safely, or is of another kind.
    """
    path = Path(path)
    accepted = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if any(k not in KINDS for k in accepted):
        raise ValueError(f"unknown checkpoint kind in {accepted}; use {sorted(KINDS)}")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file; pass the .pt/.pth/.safetensors file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(path, "the file is empty (0 bytes); an interrupted copy or download? Copy it again")
    if _is_safetensors(path, head):
        obj = _read_safetensors(path)
    elif head.startswith(_ZIP) or head.startswith(_PICKLE):
        obj = _read_torch(path, zipped=head.startswith(_ZIP))
    else:
        raise CheckpointError(path, f"not a checkpoint: it starts with {_preview(head)}, where a torch.save file "
                                    "starts with a zip or pickle header and a .safetensors file with its header "
                                    "size; pass the .pt/.pth/.bin/.safetensors file")
    if accepted:
        _check_kind(path, obj, accepted)
    return obj


def _is_safetensors(path: Path, head: bytes) -> bool:
    # u64 little-endian header length, then the JSON header
    return path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(path, f"truncated or damaged safetensors file ({_first_line(error)}); "
                                    "copy or download it again") from error


def _read_torch(path: Path, *, zipped: bool) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise CheckpointError(
                path, "it holds Python objects that cannot be loaded safely (torch.load weights_only=True). "
                "If you trust the file, re-save its tensors only: "
                "torch.save(torch.load(PATH, weights_only=False)['model'], 'clean.pth')") from error
        raise CheckpointError(path, f"truncated or damaged ({_first_line(error)}); copy it again") from error
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as error:
        damage = "truncated or damaged" if zipped or isinstance(error, EOFError) else "damaged or not a checkpoint"
        raise CheckpointError(path, f"{damage} ({type(error).__name__}: {_first_line(error)}); "
                                    "an interrupted copy or download? Copy it again") from error


def _check_kind(path: Path, obj: Any, accepted: tuple[str, ...]) -> None:
    found = checkpoint_kind(obj)
    if found in accepted:
        return
    holds = KINDS[found]
    if found == "trained":
        holds = f"a {obj['histoscope_model']!r} model trained by histoscope train"
    elif found == "weights" and isinstance(obj, Mapping):
        holds += f" with keys {_keys(obj)}"
    fixes = {
        "trained": "pass a fold_k/checkpoint.pt written by histoscope train",
        "train_state": "pass a fold's train_state.pt",
        "align": "pass the model.pt of a histoscope train-align run",
        "chat": "pass the folder (or model.pt) of a histoscope train-chat run",
        "weights": "pass a weights file (a state dict)",
    }
    fix = "; or ".join(fixes[k] for k in accepted)
    if found == "train_state":
        fix += " (a fold writes checkpoint.pt when it finishes: rerun histoscope train to finish it)"
    raise CheckpointError(path, f"holds {holds}, not {' or '.join(KINDS[k] for k in accepted)}: {fix}")


def compare_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]
                       ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """``(missing, unexpected, mismatched)`` keys of ``state`` against ``model``;
    ``mismatched`` holds ``(key, checkpoint shape, model shape)``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape))
                  for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatched


def _keys(obj: Mapping) -> str:
    keys = [str(k) for k in list(obj)[:_SHOWN]]
    return ", ".join(keys) + (", …" if len(obj) > _SHOWN else "")


def _preview(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c.isspace() for c in text):
        return f"{text!r} (text)"
    return f"bytes {head[:8].hex(' ')}"


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (torch appends paragraphs of advice)."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__
