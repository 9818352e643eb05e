"""The backend-independent :class:`Slide` interface.

Coordinates follow OpenSlide: ``(x, y)`` with x along the width, always given in
level-0 pixels unless a name says otherwise. Images are ``(H, W, 3)`` uint8 RGB.
Areas outside the slide read as white (255), the colour of empty glass.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.io.errors import MissingMppError

__all__ = ["Level", "Slide", "MPP_RTOL", "READ_CHUNK"]

# Levels whose resolution is within 1% of a target count as that resolution: scanners
# store downsamples such as 3.9998, and resizing a 256-px tile to 255 px is noise.
MPP_RTOL = 1e-2

BACKGROUND = 255

# Edge in source pixels of the blocks whole-slide reads are made of: one block of RGB
# is 48 MB, whatever the size of the level read.
READ_CHUNK = 4096


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


class Slide(abc.ABC):
    """A whole-slide image (or a plain image) with pyramid levels and a resolution.

    Subclasses implement :meth:`_read_level` for in-bounds rectangles of one level;
    everything else (clipping, resolution arithmetic, tiles at a target mpp,
    streaming low-resolution reads) is shared here so every backend behaves alike.
    """

    backend: str = "abstract"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None):
        self.path = Path(path)
        if slide_mpp is not None and not (slide_mpp > 0 and math.isfinite(slide_mpp)):
            raise ValueError(f"{self.path}: slide_mpp (the level-0 µm/px override) must be a positive number, "
                             f"got {slide_mpp!r}")
        self._mpp_override = slide_mpp
        self.vendor = "unknown"
        self.properties = {}
        self.associated_images = ()

    # ---- what a backend provides -------------------------------------------------
    # Set by each backend's __init__:
    levels: tuple[Level, ...]  # pyramid levels, finest first
    metadata_mpp: float | None  # level-0 µm/px as stored in the file, or None
    vendor: str
    properties: dict[str, str]  # the format's metadata as key/value strings
    associated_images: tuple[str, ...]  # label/macro/thumbnail images beside the pyramid

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(f"{self.path}: no associated image {name!r}; available: {list(self.associated_images)}")

    @abc.abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 from ``level`` at level coordinates, fully in bounds."""

    def _read_level_into(self, level: int, x: int, y: int, out: np.ndarray) -> bool:
        """Optional fast path: fill ``out`` (h, w, 3) from ``level`` at (x, y) directly
        and return True, or return False to take the general path."""
        return False

    def close(self) -> None:
        """Release file handles (the slide reopens them if used again)."""

    # ---- shared behaviour -----------------------------------------------------------
    @property
    def name(self) -> str:
        """Slide id used in output file names: the file name without its extension(s)."""
        name = self.path.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem if self.path.suffix else name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def mpp(self) -> float:
        """Level-0 µm/px: the override if one was given, else the file's; never a guess."""
        if self._mpp_override is not None:
            return self._mpp_override
        mpp = self.metadata_mpp
        if mpp is None:
            raise MissingMppError(self.path)
        return mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp_override is not None or self.metadata_mpp is not None

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample <= downsample * (1 + MPP_RTOL):
                best = index
        return best

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``mpp``.

        Reading there and shrinking gives the exact target with the least decoding;
        level 0 is returned when even it is coarser than the target.
        """
        return self.best_level_for_downsample(mpp / self.mpp)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 at ``level``; ``location`` is level-0 (x, y), like OpenSlide."""
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: level {level} out of range (0..{self.level_count - 1})")
        downsample = self.levels[level].downsample
        x = int(math.floor(location[0] / downsample))
        y = int(math.floor(location[1] / downsample))
        region = self._read_level_clipped(level, x, y, int(size[0]), int(size[1]))
        # Backends may return read-only views of cached tiles; callers own what they get.
        return region if region.flags.writeable else region.copy()

    def _read_level_clipped(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lvl = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lvl.width), min(y + height, lvl.height)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read_level(level, x, y, width, height)
        out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_plan(self, size: int, mpp: float | None) -> tuple[int, int]:
        """(level, pixels read at that level) for a tile of ``size`` px at ``mpp`` µm/px.

        ``mpp=None`` means the native level-0 resolution.
        """
        if mpp is None:
            return 0, size
        level = self.best_level_for_mpp(mpp)
        return level, max(1, round(size * mpp / self.level_mpp(level)))

    def read_tiles(
        self,
        coords: np.ndarray,
        size: int = 256,
        mpp: float | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Tiles of ``size`` px at ``mpp`` µm/px whose top-left corners are ``coords``.

        Parameters
        ----------
        coords : (N, 2) int
            Level-0 (x, y) of each tile's top-left corner.
        size : int
            Output tile edge in pixels.
        mpp : float or None
            Target resolution; ``None`` reads level 0 as stored.

        Returns
        -------
        (N, size, size, 3) uint8
        """
        import cv2

        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        level, read = self.read_plan(size, mpp)
        if out is None:
            out = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        downsample = self.levels[level].downsample
        interpolation = cv2.INTER_AREA if read > size else cv2.INTER_CUBIC
        for i, (x, y) in enumerate(coords.tolist()):  # Python ints: cheaper than numpy scalars per tile
            lx, ly = math.floor(x / downsample), math.floor(y / downsample)
            if read == size and self._read_level_into(level, lx, ly, out[i]):
                continue
            region = self._read_level_clipped(level, lx, ly, read, read)
            if read != size:
                region = cv2.resize(region, (size, size), interpolation=interpolation)
            out[i] = region
        return out

    def read_at_mpp(self, mpp: float, *, chunk: int = READ_CHUNK) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px; see :meth:`read_at_downsample`."""
        return self.read_at_downsample(mpp / self.mpp, chunk=chunk)

    def read_at_downsample(self, downsample: float, *, chunk: int = READ_CHUNK) -> np.ndarray:
        """The whole slide shrunk ``downsample`` times, read in chunks.

        Memory is the output plus one ``chunk``-square block of the source level,
        never the whole of a fine level.
        """
        import cv2

        level = self.best_level_for_downsample(downsample)
        lvl = self.levels[level]
        scale = lvl.downsample / downsample  # output px per source px, <= ~1
        out_w = max(1, round(lvl.width * scale))
        out_h = max(1, round(lvl.height * scale))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        # Chunk edges land on output pixel boundaries so no output pixel is split.
        step_out = max(1, int(chunk * scale))
        for oy in range(0, out_h, step_out):
            for ox in range(0, out_w, step_out):
                ow, oh = min(step_out, out_w - ox), min(step_out, out_h - oy)
                sx0, sy0 = int(round(ox / scale)), int(round(oy / scale))
                sx1 = min(lvl.width, int(round((ox + ow) / scale)))
                sy1 = min(lvl.height, int(round((oy + oh) / scale)))
                block = self._read_level_clipped(level, sx0, sy0, max(1, sx1 - sx0), max(1, sy1 - sy0))
                if block.shape[:2] != (oh, ow):
                    block = cv2.resize(block, (ow, oh), interpolation=cv2.INTER_AREA)
                out[oy : oy + oh, ox : ox + ow] = block
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide shrunk so its longer side is at most ``max_size`` px."""
        return self.read_at_downsample(max(1.0, max(self.dimensions) / max_size))

    def info(self) -> dict[str, Any]:
        """Summary used by ``histoscope info``."""
        return {
            "path": str(self.path),
            "name": self.name,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "mpp": self.mpp if self.has_mpp else None,
            "levels": [
                {"width": l.width, "height": l.height, "downsample": round(l.downsample, 4)}
                for l in self.levels
            ],
            "associated_images": list(self.associated_images),
        }

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count})"
