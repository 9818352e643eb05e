"""Plain images (PNG, JPEG, single-level TIFF, BMP) as one-level slides, for ROIs and
TMA cores. The image is decoded once and kept in memory, so it is meant for images of
at most a few hundred megapixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoscope.io.errors import CorruptSlideError
from histoscope.io.mpp import mpp_from_png_dpm, mpp_from_resolution
from histoscope.io.slide import Level, Slide

__all__ = ["ImageSlide", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageSlide(Slide):
    """A single-level image held in memory."""

    backend = "image"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None):
        super().__init__(path, slide_mpp=slide_mpp)
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None  # ROI files are trusted local data, not web uploads
        try:
            with Image.open(self.path) as image:
                self.vendor = (image.format or "image").lower()
                self.metadata_mpp = _pil_mpp(image)
                self._array = np.asarray(image.convert("RGB"))
        except UnidentifiedImageError as error:
            raise CorruptSlideError(self.path, "not a readable image") from error
        except OSError as error:
            raise CorruptSlideError(self.path, f"image is damaged or truncated ({error})") from error
        height, width = self._array.shape[:2]
        self.levels = (Level(width, height, 1.0),)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array[y : y + height, x : x + width]


def _pil_mpp(image) -> float | None:
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        return mpp_from_resolution(tags.get(282), tags.get(296))
    if image.format == "PNG":
        # Pillow exposes pHYs as dots per inch; convert back to pixels per metre.
        dpi = image.info.get("dpi")
        return mpp_from_png_dpm(float(dpi[0]) / 0.0254) if dpi and dpi[0] else None
    return None
