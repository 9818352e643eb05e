"""Exceptions raised when a slide cannot be opened or read.

Every message names the file and says what to do about it, because these
errors end up in batch run reports read by people who did not write the code.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SlideError", "UnsupportedSlideError", "CorruptSlideError", "MissingMppError"]


class SlideError(Exception):
    """Base class for every slide-level failure; carries the offending path."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class UnsupportedSlideError(SlideError):
    """The file is not a slide or image format that any backend can read."""


class CorruptSlideError(SlideError):
    """The file looks like a slide but is truncated or damaged."""


class MissingMppError(SlideError):
    """The slide has no physical resolution and none was given."""

    def __init__(self, path: str | Path):
        super().__init__(
            path,
            "no microns-per-pixel (mpp) in the slide metadata; histoscope never guesses it. "
            "Pass it explicitly: `--slide-mpp 0.25` on the command line, an `mpp` column in "
            "the slide CSV, or `open_slide(path, slide_mpp=0.25)` in Python.",
        )
