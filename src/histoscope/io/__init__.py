"""Reading slides: one :class:`Slide` interface over OpenSlide, a fast TIFF path and
plain images, with the physical resolution (µm/px) always explicit."""

from histoscope.io.errors import (
    CorruptSlideError,
    ImplausibleMppError,
    MissingMppError,
    SlideError,
    UnsupportedSlideError,
)
from histoscope.io.open import BACKENDS, open_slide, select_backend
from histoscope.io.slide import Level, Slide

__all__ = [
    "BACKENDS",
    "CorruptSlideError",
    "ImplausibleMppError",
    "Level",
    "MissingMppError",
    "Slide",
    "SlideError",
    "UnsupportedSlideError",
    "open_slide",
    "select_backend",
]
