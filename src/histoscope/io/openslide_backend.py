"""OpenSlide backend: every vendor format OpenSlide reads (SVS, NDPI, MRXS, SCN, BIF,
Philips TIFF, DICOM, generic tiled TIFF)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histoscope.io.errors import CorruptSlideError, UnsupportedSlideError
from histoscope.io.mpp import mpp_from_openslide, mpp_from_resolution
from histoscope.io.slide import BACKGROUND, Level, Slide

__all__ = ["OpenSlideSlide", "openslide_format"]


def openslide_format(path: str | Path) -> str | None:
    """OpenSlide's vendor name for ``path``, or ``None`` if OpenSlide cannot read it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA over a white background, as uint8 RGB."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # Premultiplied: colour + (1 - alpha) * white.
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))
    return np.minimum(out, BACKGROUND).astype(np.uint8)


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide's ``read_region``."""

    backend = "openslide"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None):
        super().__init__(path, slide_mpp=slide_mpp)
        self._handle = None
        self._pid = -1
        handle = self._open()
        self.levels = tuple(
            Level(int(w), int(h), float(d)) for (w, h), d in zip(handle.level_dimensions, handle.level_downsamples)
        )
        self.properties = dict(handle.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.associated_images = tuple(handle.associated_images.keys())
        self.metadata_mpp = mpp_from_openslide(self.properties)
        if self.metadata_mpp is None and "tiff.XResolution" in self.properties:
            unit = {"inch": 2, "centimeter": 3}.get(self.properties.get("tiff.ResolutionUnit", ""))
            try:
                self.metadata_mpp = mpp_from_resolution(float(self.properties["tiff.XResolution"]), unit)
            except ValueError:
                self.metadata_mpp = None

    def _open(self):
        import openslide

        if self._handle is None or self._pid != os.getpid():
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no such slide file")
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideUnsupportedFormatError as error:
                raise UnsupportedSlideError(self.path, "OpenSlide does not recognise this format") from error
            except openslide.OpenSlideError as error:
                raise CorruptSlideError(self.path, f"OpenSlide cannot open it: {error}") from error
            self._pid = os.getpid()
        return self._handle

    def read_associated(self, name: str) -> np.ndarray:
        if name not in self.associated_images:
            return super().read_associated(name)
        return rgba_to_rgb(np.asarray(self._open().associated_images[name].convert("RGBA")))

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        import openslide

        downsample = self.levels[level].downsample
        location = (int(round(x * downsample)), int(round(y * downsample)))
        try:
            image = self._open().read_region(location, level, (width, height))
        except openslide.OpenSlideError as error:
            raise CorruptSlideError(self.path, f"read failed at level {level} ({x}, {y}): {error}") from error
        return rgba_to_rgb(np.asarray(image))

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=-1)
        return state
