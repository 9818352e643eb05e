"""Fast path for tiled pyramidal TIFF (Aperio SVS, generic pyramidal TIFF, OME-TIFF).

OpenSlide spends most of ``read_region`` compositing through cairo; here a tile is one
``pread`` of its bytes (offsets from the TIFF tags) and one libjpeg-turbo decode via
imagecodecs, with the shared ``JPEGTables`` and the TIFF's colour space, so pixels
match OpenSlide's up to decoder rounding. Decoded tiles are kept in a small LRU
cache because neighbouring tiles at a target resolution straddle stored tiles.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.io.errors import CorruptSlideError, UnsupportedSlideError
from histoscope.io.mpp import mpp_from_aperio, mpp_from_ome, mpp_from_resolution
from histoscope.io.slide import BACKGROUND, Level, Slide

__all__ = ["TiffSlide", "fast_path_reason"]

_JPEG = 7
_DIRECT_CODECS = {_JPEG}
# Compressions decoded through tifffile's own codec table (still one pread per tile).
_TIFFFILE_CODECS = {1, 5, 8, 32946, 33005, 34712, 50000, 50001}
# NewSubfileType of Aperio's stripped pages (OpenSlide 4.0.1 names them by this tag,
# as the GT 450 writes no ImageDescription on them).
_APERIO_SUBFILE_NAMES = {1: "label", 9: "macro"}
# Vendor TIFF dialects with layouts OpenSlide knows and the fast path does not.
_VENDOR_FLAGS = ("is_ndpi", "is_philips", "is_scn", "is_bif", "is_qpi", "is_mmstack", "is_lsm", "is_stk")


@dataclass
class _LevelLayout:
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    offsets: np.ndarray  # (T,) int64
    bytecounts: np.ndarray  # (T,) int64
    compression: int
    jpegtables: bytes | None
    colorspace: int | None
    outcolorspace: int | None
    page_index: int


def _jpeg_colorspaces(photometric: int, is_jfif: bool) -> tuple[int | None, int | None]:
    # YCbCr data is converted to RGB by libjpeg; Aperio stores RGB-coded JPEG without
    # a JFIF/Adobe marker, which libjpeg would otherwise treat as YCbCr.
    if photometric == 6:
        return None, 2
    if photometric == 2:
        return (None if is_jfif else 2), 2
    return None, None


def _pyramid_pages(tif) -> list:
    """Tiled pages forming the pyramid, finest first.

    OME-TIFF keeps its reduced levels in SubIFDs, read through tifffile's OME series.
    Otherwise levels are decided by geometry: every tiled top-level page with level
    0's samples and aspect ratio, which in Aperio and generic pyramids are the pages
    OpenSlide takes as levels. (tifffile's SVS series names page 1 the thumbnail even
    when it is a tiled level, as in Aperio files written without a thumbnail page,
    so it is not used.)
    """
    if tif.is_ome:
        return [level.keyframe for level in tif.series[0].levels]
    first = tif.pages.first
    aspect = first.imagewidth / first.imagelength
    pages = []
    for page in tif.pages:
        if not page.is_tiled or page.samplesperpixel != first.samplesperpixel:
            continue
        if abs(page.imagewidth / page.imagelength - aspect) > 0.02 * aspect + 2 / page.imagelength:
            continue
        pages.append(page)
    pages.sort(key=lambda p: -p.imagewidth)
    return pages


def _aperio_associated_pages(tif) -> dict[str, int]:
    """Page index of each associated image of an SVS file, named as OpenSlide names them.

    Aperio stores them stripped, the pyramid tiled: the stripped second page is the
    thumbnail, other stripped pages are the label (NewSubfileType 1) or the macro
    photograph (9). A later page of the same kind replaces an earlier one.
    """
    found = {}
    for page in tif.pages:
        if page.is_tiled:
            continue
        name = "thumbnail" if page.index == 1 else _APERIO_SUBFILE_NAMES.get(int(page.subfiletype))
        if name is not None:
            found[name] = page.index
    return found


def fast_path_reason(tif) -> str | None:
    """Why the fast path cannot read this open ``tifffile.TiffFile`` (``None``: it can)."""
    for flag in _VENDOR_FLAGS:
        if getattr(tif, flag, False):
            return f"{flag[3:]} TIFF dialect"
    first = tif.pages.first
    if not first.is_tiled:
        return "level 0 is not tiled"
    for page in _pyramid_pages(tif):
        if page.compression not in _DIRECT_CODECS | _TIFFFILE_CODECS:
            return f"compression {page.compression!r} not handled by the fast path"
        if page.planarconfig != 1 or page.bitspersample != 8:
            return "only 8-bit interleaved samples are handled by the fast path"
        if page.samplesperpixel not in (1, 3, 4):
            return f"{page.samplesperpixel} samples per pixel"
    return None


class TiffSlide(Slide):
    """Tiled pyramidal TIFF read tile-by-tile without OpenSlide."""

    backend = "tiff"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None, cache_bytes: int = 64 << 20):
        super().__init__(path, slide_mpp=slide_mpp)
        import tifffile

        self._cache_bytes = cache_bytes
        try:
            tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as error:
            raise CorruptSlideError(self.path, f"cannot parse TIFF structure ({error})") from error
        try:
            reason = fast_path_reason(tif)
            if reason:
                raise UnsupportedSlideError(self.path, f"not readable by the TIFF fast path: {reason}")
            self._parse(tif)
        finally:
            tif.close()
        self._fd: int | None = None
        self._pid = -1
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_used = 0
        self._tifffile_decoders: dict[int, object] = {}
        self._no_direct: set[int] = set()  # levels whose tiles need the general path

    # ---- parsing --------------------------------------------------------------------
    def _parse(self, tif) -> None:
        pages = _pyramid_pages(tif)
        first = pages[0]
        description = first.description or ""
        self.vendor = "aperio" if tif.is_svs else ("ome" if tif.is_ome else "generic-tiff")
        self.properties = {"tiff.ImageDescription": description}
        if tif.is_svs:
            self.metadata_mpp = mpp_from_aperio(description)
        elif tif.is_ome:
            self.metadata_mpp = mpp_from_ome(tif.pages.first.description)
        else:
            self.metadata_mpp = None
        if self.metadata_mpp is None:
            tags = first.tags
            xres = tags["XResolution"].value if "XResolution" in tags else None
            # An absent ResolutionUnit means inch (TIFF 6.0 default), as OpenSlide reads it.
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            self.metadata_mpp = mpp_from_resolution(xres, unit)
        self._layouts: list[_LevelLayout] = []
        file_size = os.path.getsize(self.path)
        for page in pages:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if len(offsets) and int((offsets + counts).max()) > file_size:
                raise CorruptSlideError(
                    self.path, f"tile data of page {page.index} runs past the end of the file (truncated download?)"
                )
            is_jfif = False
            if page.compression == _JPEG and len(offsets):
                nonzero = np.flatnonzero(counts)
                if len(nonzero):
                    with open(self.path, "rb") as fh:
                        fh.seek(int(offsets[nonzero[0]]))
                        is_jfif = b"JFIF" in fh.read(32)
            colorspace, outcolorspace = _jpeg_colorspaces(int(page.photometric), is_jfif)
            self._layouts.append(
                _LevelLayout(
                    width=page.imagewidth,
                    height=page.imagelength,
                    tile_width=page.tilewidth,
                    tile_height=page.tilelength,
                    tiles_across=-(-page.imagewidth // page.tilewidth),
                    offsets=offsets,
                    bytecounts=counts,
                    compression=int(page.compression),
                    jpegtables=page.jpegtables,
                    colorspace=colorspace,
                    outcolorspace=outcolorspace,
                    page_index=page.index if isinstance(page.index, int) else -1,
                )
            )
        w0, h0 = self._layouts[0].width, self._layouts[0].height
        # OpenSlide's definition: the mean of the two axis ratios.
        self.levels = tuple(
            Level(l.width, l.height, (w0 / l.width + h0 / l.height) / 2) for l in self._layouts
        )
        self._associated = _aperio_associated_pages(tif) if tif.is_svs else {}
        self.associated_images = tuple(sorted(self._associated))  # sorted, as OpenSlide lists them

    def read_associated(self, name: str) -> np.ndarray:
        if name not in self._associated:
            return super().read_associated(name)
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            image = tif.pages[self._associated[name]].asarray()
        return _to_rgb(image, self.path)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._cache.clear()
        self._cache_used = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _pid=-1, _cache=OrderedDict(), _cache_used=0, _tifffile_decoders={}, _no_direct=set())
        return state

    # ---- tile access ----------------------------------------------------------------
    def _file(self) -> int:
        # A forked worker must not share the parent's descriptor offset or cache.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
            self._cache = OrderedDict()
            self._cache_used = 0
        return self._fd

    def read_raw_tile(self, level: int, index: int) -> bytes:
        """The stored (compressed) bytes of tile ``index`` of ``level``."""
        layout = self._layouts[level]
        count = int(layout.bytecounts[index])
        if count == 0:
            return b""
        data = os.pread(self._file(), count, int(layout.offsets[index]))
        if len(data) != count:
            raise CorruptSlideError(self.path, f"tile {index} of level {level} is truncated")
        return data

    def decode_tile(self, level: int, index: int) -> np.ndarray:
        """(tile_height, tile_width, 3) uint8 of one stored tile, edge padding included."""
        layout = self._layouts[level]
        data = self.read_raw_tile(level, index)
        if not data:  # sparse tile: nothing scanned there
            tile = np.full((layout.tile_height, layout.tile_width, 3), BACKGROUND, np.uint8)
            tile.flags.writeable = False
            return tile
        try:
            if layout.compression == _JPEG:
                import imagecodecs

                tile = imagecodecs.jpeg8_decode(
                    data,
                    tables=layout.jpegtables,
                    colorspace=layout.colorspace,
                    outcolorspace=layout.outcolorspace,
                )
            else:
                tile = self._decode_with_tifffile(level, index, data)
        except Exception as error:  # codec errors have no common base class
            raise CorruptSlideError(self.path, f"cannot decode tile {index} of level {level}: {error}") from error
        tile = _to_rgb(tile, self.path)
        tile.flags.writeable = False  # cached and shared: callers get copies or views
        return tile

    def _read_level_into(self, level: int, x: int, y: int, out: np.ndarray) -> bool:
        # A request that is exactly one stored JPEG tile is decoded straight into the
        # caller's buffer: no cache entry, no copy, no fresh allocation per tile.
        layout = self._layouts[level]
        height, width = out.shape[:2]
        if (layout.compression != _JPEG or width != layout.tile_width or height != layout.tile_height
                or x % width or y % height or x + width > layout.width or y + height > layout.height
                or not out.flags.c_contiguous or level in self._no_direct):
            return False
        data = self.read_raw_tile(level, (y // height) * layout.tiles_across + x // width)
        if not data:
            return False
        import imagecodecs

        try:
            imagecodecs.jpeg8_decode(data, tables=layout.jpegtables, colorspace=layout.colorspace,
                                     outcolorspace=layout.outcolorspace, out=out)
        except Exception:  # e.g. a grayscale tile: let the general path convert it
            self._no_direct.add(level)
            return False
        return True

    def _decode_with_tifffile(self, level: int, index: int, data: bytes) -> np.ndarray:
        decoder = self._tifffile_decoders.get(level)
        if decoder is None:
            import tifffile

            # The TiffFile only lends its page's decode closure (codec, predictor,
            # shapes); the closure works on bytes we read ourselves.
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[self._layouts[level].page_index]
                decoder = page.decode
            self._tifffile_decoders[level] = decoder
        tile, _, _ = decoder(data, index, jpegtables=self._layouts[level].jpegtables)
        return np.asarray(tile).reshape(tile.shape[-3:])

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        tile = self.decode_tile(level, index)
        if self._cache_bytes > 0:
            self._cache[key] = tile
            self._cache_used += tile.nbytes
            while self._cache_used > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_used -= old.nbytes
        return tile

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        layout = self._layouts[level]
        tw, th = layout.tile_width, layout.tile_height
        tx0, ty0 = x // tw, y // th
        tx1, ty1 = (x + width - 1) // tw, (y + height - 1) // th
        if tx0 == tx1 and ty0 == ty1:  # one stored tile: a view, no assembly
            tile = self._tile(level, ty0 * layout.tiles_across + tx0)
            ox, oy = x - tx0 * tw, y - ty0 * th
            return tile[oy : oy + height, ox : ox + width]
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile = self._tile(level, ty * layout.tiles_across + tx)
                gx0, gy0 = tx * tw, ty * th
                sx0, sy0 = max(x, gx0), max(y, gy0)
                sx1, sy1 = min(x + width, gx0 + tw), min(y + height, gy0 + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]
        return out

    def tile_grid(self, level: int) -> tuple[int, int, int, int]:
        """(tile_width, tile_height, tiles_across, tiles_down) of a level's storage."""
        layout = self._layouts[level]
        return layout.tile_width, layout.tile_height, layout.tiles_across, -(-layout.height // layout.tile_height)


def _to_rgb(image: np.ndarray, path: Path) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UnsupportedSlideError(path, f"{image.dtype} pixels; only 8-bit images are supported")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3] if image.shape[2] > 3 else image
