"""Where ``histoscope predict`` writes its tables (importable without torch, for readers such as the viewer)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["predictions_path"]


def predictions_path(out_dir: str | Path, suffix: str = ".csv") -> Path:
    """``OUT/predictions.csv`` (or ``.json``): one row per slide predicted."""
    return (Path(out_dir) / "predictions").with_suffix(suffix)
