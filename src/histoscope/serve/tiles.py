"""Encoded Deep Zoom tiles, kept in an LRU cache bounded by bytes.

The cache holds what is sent (JPEG/PNG bytes), so a tile asked for again costs a dict
look-up; its size is a memory bound, not a count, because PNG tiles are ten times the
size of JPEG ones. The ETag of a tile names the slide file's size and modification
time, so a browser's copy stays valid exactly as long as the file does.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from histoscope.serve.catalog import Catalog
from histoscope.serve.deepzoom import DeepZoomGeometry, encode_tile, read_dz_tile

__all__ = ["ByteLRU", "TileService"]


class ByteLRU:
    """Least-recently-used bytes values, at most ``max_bytes`` of them in total (thread-safe)."""

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

    def put(self, key, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._items[key] = value
            self.used += len(value)
            while self.used > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.used -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


class TileService:
    """Deep Zoom descriptors and tiles of the catalog's slides."""

    def __init__(self, catalog: Catalog, *, cache_bytes: int = 256 << 20, tile_size: int = 254, overlap: int = 1,
                 quality: int = 75):
        self.catalog = catalog
        self.cache = ByteLRU(cache_bytes)
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
        key = (slide_id, level, col, row, fmt)
        data = self.cache.get(key)
        if data is None:
            geometry = self.geometry(slide_id)
            geometry.tile_box(level, col, row)  # IndexError before any reading
            with self.catalog.open(slide_id) as slide:
                pixels = read_dz_tile(slide, geometry, level, col, row)
            data = encode_tile(pixels, fmt, quality=self.quality)
            self.cache.put(key, data)
        return data
