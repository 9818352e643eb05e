"""Deep Zoom tiles straight from a slide's pyramid.

Deep Zoom (the format OpenSeadragon reads) numbers its levels from 0, a 1 × 1 image,
to ``max_level``, the full level-0 size; each level is the next one halved and rounded
up. A level is cut into ``tile_size`` squares, each grown by ``overlap`` px on every
side that touches a neighbour (never at the image's own edges). A tile is read from
the coarsest pyramid level at least as fine as its Deep Zoom level and shrunk to size
only when that level is finer, so tiles of a level the pyramid stores are its pixels
as they are.

Notation: ``L`` a Deep Zoom level, ``f = 2 ** (max_level - L)`` its downsample from
level 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from histoscope.io.slide import Slide

__all__ = ["DeepZoomGeometry", "TileBox", "read_dz_tile", "encode_tile", "FORMATS", "dzi_xml"]

# Tile extension → media type; ``jpeg`` and ``jpg`` are the same encoding.
FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


@dataclass(frozen=True)
class TileBox:
    """Where a Deep Zoom tile lies in its level: (x, y) corner and (width, height), overlap included."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class DeepZoomGeometry:
    """Level sizes and tile boxes of a ``width`` × ``height`` image (OpenSlide's DeepZoomGenerator
    with ``limit_bounds=False``)."""

    width: int
    height: int
    tile_size: int = 254
    overlap: int = 1

    def __post_init__(self):
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, got {self.width} x {self.height}")
        if self.tile_size < 1 or self.overlap < 0:
            raise ValueError(f"tile_size must be >= 1 and overlap >= 0, got {self.tile_size}, {self.overlap}")

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 (1 × 1) first."""
        size = (self.width, self.height)
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, -(-size[0] // 2)), max(1, -(-size[1] // 2)))
            sizes.append(size)
        return tuple(reversed(sizes))

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)  # ceil(log2(max(width, height))) + 1

    def level_tiles(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        width, height = self.level_dimensions[level]
        return -(-width // self.tile_size), -(-height // self.tile_size)

    def downsample(self, level: int) -> int:
        """Level-0 pixels per pixel of ``level``."""
        return 2 ** (self.level_count - 1 - level)

    def tile_box(self, level: int, col: int, row: int) -> TileBox:
        """The tile's box in ``level`` pixels; IndexError when the address does not exist."""
        if not 0 <= level < self.level_count:
            raise IndexError(f"level {level} out of range (0..{self.level_count - 1})")
        cols, rows = self.level_tiles(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(f"tile ({col}, {row}) out of range at level {level} ({cols} x {rows} tiles)")
        width, height = self.level_dimensions[level]
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(width, (col + 1) * self.tile_size + (self.overlap if col < cols - 1 else 0))
        y1 = min(height, (row + 1) * self.tile_size + (self.overlap if row < rows - 1 else 0))
        return TileBox(x0, y0, x1 - x0, y1 - y0)


def read_dz_tile(slide: Slide, geometry: DeepZoomGeometry, level: int, col: int, row: int, *,
                 read: Callable[[int, int, int, int, int], np.ndarray] | None = None) -> np.ndarray:
    """(h, w, 3) uint8 pixels of one Deep Zoom tile of ``slide``.

    Read from the coarsest pyramid level whose downsample does not exceed the Deep Zoom
    level's; shrunk by area averaging when that pyramid level is finer. ``read(level, x,
    y, width, height)`` reads an in-bounds rectangle of a pyramid level (default: the
    slide's own reader).
    """
    import cv2

    box = geometry.tile_box(level, col, row)
    f = geometry.downsample(level)
    source = slide.best_level_for_downsample(f)
    lvl = slide.levels[source]
    scale = f / lvl.downsample  # source px per Deep Zoom px, >= ~1
    if abs(scale - round(scale)) < 1e-3:
        scale = float(round(scale))
    # The box in source-level pixels, clipped to the level (the last Deep Zoom row or
    # column may reach past it by rounding up).
    sx0, sy0 = int(math.floor(box.x * scale)), int(math.floor(box.y * scale))
    sx1 = min(lvl.width, int(math.ceil((box.x + box.width) * scale)))
    sy1 = min(lvl.height, int(math.ceil((box.y + box.height) * scale)))
    sx0, sy0 = min(sx0, lvl.width - 1), min(sy0, lvl.height - 1)
    read = read or slide._read_level_clipped
    region = read(source, sx0, sy0, max(1, sx1 - sx0), max(1, sy1 - sy0))
    if region.shape[:2] != (box.height, box.width):
        region = cv2.resize(region, (box.width, box.height), interpolation=cv2.INTER_AREA)
    return region


def encode_tile(pixels: np.ndarray, fmt: str, *, quality: int = 75) -> bytes:
    """JPEG (libjpeg-turbo) or lossless PNG bytes of (h, w, 3) uint8 pixels."""
    import imagecodecs

    pixels = np.ascontiguousarray(pixels)
    if fmt in ("jpeg", "jpg"):
        return bytes(imagecodecs.jpeg8_encode(pixels, level=quality))
    if fmt == "png":
        return bytes(imagecodecs.png_encode(pixels, level=1))
    raise ValueError(f"unknown tile format {fmt!r}; use one of {sorted(FORMATS)}")


def dzi_xml(geometry: DeepZoomGeometry, fmt: str = "jpeg") -> str:
    """The ``.dzi`` descriptor: Size is the level-0 size."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
            f'Overlap="{geometry.overlap}" TileSize="{geometry.tile_size}">'
            f'<Size Width="{geometry.width}" Height="{geometry.height}"/></Image>\n')
