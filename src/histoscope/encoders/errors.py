"""Exceptions raised when a tile encoder or its weights cannot be loaded.

Every message names the encoder and the file or Hub repo involved and says how to
fix the problem, because these errors reach people running batch jobs, not only
the people who wrote the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from histoscope.io.checkpoint import CheckpointError

__all__ = [
    "CorruptWeightsError",
    "UnknownTileEncoderError",
    "WeightsAccessError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
]

_SHOWN = 10  # keys listed per category in a mismatch report


class UnknownTileEncoderError(LookupError):
    """No registered encoder (or ``timm:`` / ``hf-hub:`` model) has this name."""


class WeightsError(Exception):
    """Base class for every failure to find, read or load encoder weights."""


class WeightsNotFoundError(WeightsError):
    """A weights path does not exist, or a folder holds none of the expected files."""


class WeightsAccessError(WeightsError):
    """The Hugging Face Hub refused or could not serve the weights (gated, offline, missing token)."""


class CorruptWeightsError(WeightsError, CheckpointError):
    """The weights file exists but cannot be read (truncated, damaged, or not a checkpoint)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        Exception.__init__(self, f"{self.path}: cannot read the weights file: {reason}")


class WeightsMismatchError(WeightsError):
    """The checkpoint's tensors do not fit the encoder (missing, unexpected or wrongly shaped keys)."""

    def __init__(self, *, path: str | Path | None, encoder: str, checkpoint_format: str,
                 missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]], hint: str):
        self.path = Path(path) if path is not None else None
        self.encoder = encoder
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"{self.path or 'state dict'}: does not match tile encoder '{encoder}' "
                 f"(checkpoint layout '{checkpoint_format}'):"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing keys: {_first(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected keys: {_first(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in self.mismatched]
            lines.append(f"  {len(shapes)} shape mismatches: {_first(shapes)}")
        lines.append(hint)
        super().__init__("\n".join(lines))


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
