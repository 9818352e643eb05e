"""Deep Zoom tiles made once: encoded tiles and decoded stored tiles in LRU caches bounded by bytes.

The first cache holds what is sent (JPEG/PNG bytes), so a tile asked for again costs a
dict look-up; its size is a memory bound, not a count, because PNG tiles are ten times
the size of JPEG ones. The second holds the slide's stored tiles, decoded, for tiled
TIFFs: a Deep Zoom tile with its overlap straddles up to four of them, and its
neighbours, asked for at the same moment by other threads, need the same ones, so the
cache is shared by every reader of the slide. The ETag of a tile names the slide file's
size and modification time, so a browser's copy stays valid exactly as long as the file does.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from histoscope.io.slide import BACKGROUND, Slide
from histoscope.io.tiff_backend import TiffSlide
from histoscope.serve.catalog import Catalog
from histoscope.serve.deepzoom import DeepZoomGeometry, encode_tile, read_dz_tile

__all__ = ["ByteLRU", "TileService"]


def _size(value) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


class ByteLRU:
    """Least-recently-used values (bytes or arrays), at most ``max_bytes`` of them in total (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value: bytes | np.ndarray) -> None:
        if _size(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= _size(old)
            self._items[key] = value
            self.used += _size(value)
            while self.used > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.used -= _size(dropped)

    def __len__(self) -> int:
        return len(self._items)


class TileService:
    """Deep Zoom descriptors and tiles of the catalog's slides."""

    def __init__(self, catalog: Catalog, *, cache_bytes: int = 256 << 20, stored_bytes: int = 128 << 20,
                 tile_size: int = 254, overlap: int = 1, quality: int = 75):
        self.catalog = catalog
        self.cache = ByteLRU(cache_bytes)
        self.stored = ByteLRU(stored_bytes)
        self.tile_size, self.overlap, self.quality = tile_size, overlap, quality

    def geometry(self, slide_id: str) -> DeepZoomGeometry:
        info = self.catalog.info(slide_id)
        if "error" in info:
            raise ValueError(info["error"])
        return DeepZoomGeometry(info["width"], info["height"], self.tile_size, self.overlap)

    def etag(self, slide_id: str, *key: object) -> str:
        text = "|".join(map(str, (slide_id, self.catalog.mtime_tag(slide_id), self.tile_size, self.overlap,
                                  self.quality, *key)))
        return '"' + hashlib.blake2b(text.encode(), digest_size=12).hexdigest() + '"'

    def tile(self, slide_id: str, level: int, col: int, row: int, fmt: str) -> bytes:
        """Encoded tile; IndexError for an address the slide does not have."""
        fmt = "jpeg" if fmt == "jpg" else fmt
        file_key = (slide_id, self.catalog.mtime_tag(slide_id))  # a changed file never serves old tiles
        key = (*file_key, level, col, row, fmt)
        data = self.cache.get(key)
        if data is None:
            geometry = self.geometry(slide_id)
            geometry.tile_box(level, col, row)  # IndexError before any reading
            with self.catalog.open(slide_id) as slide:
                read = None
                if isinstance(slide, TiffSlide):
                    def read(source, x, y, width, height, slide=slide):
                        return self._read_stored(file_key, slide, source, x, y, width, height)
                pixels = read_dz_tile(slide, geometry, level, col, row, read=read)
            data = encode_tile(pixels, fmt, quality=self.quality)
            self.cache.put(key, data)
        return data

    def _read_stored(self, file_key: tuple, slide: Slide, level: int, x: int, y: int, width: int,
                     height: int) -> np.ndarray:
        """(height, width, 3) of a pyramid level of a tiled TIFF, assembled from the shared cache
        of decoded stored tiles (outside the level: background)."""
        tile_w, tile_h, across, _ = slide.tile_grid(level)
        lvl = slide.levels[level]
        x1, y1 = min(x + width, lvl.width), min(y + height, lvl.height)
        out = np.full((height, width, 3), BACKGROUND, np.uint8)
        for ty in range(max(y, 0) // tile_h, (y1 - 1) // tile_h + 1):
            for tx in range(max(x, 0) // tile_w, (x1 - 1) // tile_w + 1):
                key = (*file_key, level, ty * across + tx)
                stored = self.stored.get(key)
                if stored is None:
                    stored = slide.decode_tile(level, key[-1])
                    self.stored.put(key, stored)
                gx, gy = tx * tile_w, ty * tile_h
                ax0, ay0, ax1, ay1 = max(x, gx), max(y, gy), min(x1, gx + tile_w), min(y1, gy + tile_h)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = stored[ay0 - gy:ay1 - gy, ax0 - gx:ax1 - gx]
        return out
