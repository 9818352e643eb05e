"""Realistic sample slides built from real H&E (or IHC) pixels.

The texture comes from real histology shipped with installed packages (the H&E tile
of ``wsidicom-data``, scikit-image's IHC image), laid out under an irregular tissue
mask with holes, on near-white glass, written as a JPEG-tiled pyramid with mpp
metadata in the dialect asked for. The mask is returned, so segmentation can be
scored against the truth. Content is generated level by level, stripe by stripe,
so even a 150k-px slide is written with bounded memory.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SampleSlide", "make_sample_slide", "make_sample_tiles", "split_jpeg_tables", "sample_texture",
           "SVS_ASSOCIATED"]

MASK_MPP = 8.0  # µm/px of the ground-truth mask
SVS_ASSOCIATED = ("thumbnail", "label", "macro")  # the images an Aperio file keeps beside its pyramid
_APERIO_HEADER = "Aperio Image Library v12.0.15"


@dataclass(frozen=True)
class SampleSlide:
    """What :func:`make_sample_slide` wrote."""

    path: Path
    mpp: float | None  # level-0 µm/px written to the metadata (None: none written)
    dimensions: tuple[int, int]
    downsamples: tuple[int, ...]
    tissue_mask: np.ndarray  # (h, w) bool at MASK_MPP µm/px, holes excluded
    mask_mpp: float = MASK_MPP


def sample_texture(stain: str = "he") -> np.ndarray:
    """(H, W, 3) uint8 real histology: ``"he"`` (wsidicom-data) or ``"ihc"`` (scikit-image)."""
    if stain == "he":
        from PIL import Image
        from wsidicom_data import TestData

        with Image.open(TestData.get_test_tile_path()) as image:
            return np.asarray(image.convert("RGB"))
    if stain == "ihc":
        from skimage import data

        return np.ascontiguousarray(data.immunohistochemistry()[:510, :510])
    raise ValueError(f"unknown stain {stain!r}; use 'he' or 'ihc'")


def split_jpeg_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """Split a JPEG into (tables-only stream, abbreviated image stream), as scanners
    store tiles: DQT/DHT go to the TIFF ``JPEGTables`` tag and APPn markers (JFIF,
    Adobe) are dropped, which is what makes Aperio's RGB JPEG ambiguous to decoders."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG stream"
    tables, image = [b"\xff\xd8"], [b"\xff\xd8"]
    pos = 2
    while pos < len(jpeg):
        marker = jpeg[pos : pos + 2]
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        segment = jpeg[pos : pos + 2 + length]
        if marker == b"\xff\xda":  # start of scan: the rest is entropy-coded data
            image.append(jpeg[pos:])
            break
        if marker in (b"\xff\xdb", b"\xff\xc4"):
            tables.append(segment)
        elif not (0xE0 <= marker[1] <= 0xEF):
            image.append(segment)
        pos += 2 + length
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(image)


def _tissue_mask(rng: np.random.Generator, width: int, height: int, fraction: float) -> np.ndarray:
    """Irregular blobs covering about ``fraction`` of the area, with lumen-like holes."""
    import cv2

    noise = rng.standard_normal((height, width)).astype(np.float32)
    sigma = max(width, height) / 14
    field = cv2.GaussianBlur(noise, (0, 0), sigma)
    # Fade towards the borders so tissue sits on the glass, not cut by the edge.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    edge = np.minimum.reduce([xx, yy, width - 1 - xx, height - 1 - yy]) / (0.12 * min(width, height))
    field = field / field.std() - 3 * np.clip(1 - edge, 0, 1)
    mask = field > np.quantile(field, 1 - fraction)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    for label in range(1, count):  # drop specks a real section would not have
        if stats[label, cv2.CC_STAT_AREA] < 0.002 * width * height:
            mask[labels == label] = False
    # Holes: ellipses of 150-300 µm fully inside tissue.
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    candidates = np.argwhere(inner)
    for _ in range(min(4, len(candidates))):
        cy, cx = candidates[rng.integers(len(candidates))]
        axes = (int(rng.uniform(10, 19)), int(rng.uniform(10, 19)))  # at 8 µm/px: 160-300 µm
        hole = np.zeros_like(mask, np.uint8)
        cv2.ellipse(hole, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if (mask[hole > 0]).all():
            mask[hole > 0] = False
    return mask


def _pen_mask(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """A thick marker stroke on the glass beside the tissue (0.3 mm wide)."""
    import cv2

    height, width = tissue.shape
    pen = np.zeros_like(tissue, np.uint8)
    free = np.argwhere(cv2.dilate(tissue.astype(np.uint8), np.ones((25, 25), np.uint8)) == 0)
    if len(free) < 2:
        return pen.astype(bool)
    start = free[rng.integers(len(free))]
    points = [start[::-1]]
    for _ in range(6):
        step = rng.normal(0, min(width, height) / 12, size=2)
        points.append(np.clip(points[-1] + step, 0, [width - 1, height - 1]))
    cv2.polylines(pen, [np.asarray(points, np.int32)], False, 1, thickness=max(2, int(300 / MASK_MPP / 1.5)))
    return (pen > 0) & ~cv2.dilate(tissue.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)


class _LevelPainter:
    """Paints any stripe of one pyramid level deterministically."""

    def __init__(self, *, texture: np.ndarray, downsample: int, mpp: float, tissue: np.ndarray,
                 pen: np.ndarray, seed: int, width: int, height: int):
        import cv2

        cell = max(4, round(texture.shape[0] / downsample))
        base = cv2.resize(texture, (cell, cell), interpolation=cv2.INTER_AREA) if cell != texture.shape[0] else texture
        # The eight flips/rotations of the real tile, so the tiling does not repeat visibly.
        self.variants = [np.ascontiguousarray(np.rot90(v, k)) for v in (base, base[:, ::-1]) for k in range(4)]
        self.cell = cell
        self.scale = downsample * mpp / MASK_MPP  # mask px per level px
        # A slight blur turns the 8 µm mask grid into smooth edges at fine levels.
        self.tissue = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), 0.8)
        self.pen = pen.astype(np.float32)
        self.seed = seed
        self.width, self.height = width, height

    def _sample(self, mask: np.ndarray, y0: int, rows: int) -> np.ndarray:
        import cv2

        out = np.empty((rows, self.width), np.float32)
        map_y = ((np.arange(y0, y0 + rows, dtype=np.float32) + 0.5) * self.scale - 0.5)[:, None]
        # cv2.remap handles at most 32767 px per side: sample in column blocks.
        for x0 in range(0, self.width, 16384):
            x1 = min(self.width, x0 + 16384)
            map_x = ((np.arange(x0, x1, dtype=np.float32) + 0.5) * self.scale - 0.5)[None, :]
            out[:, x0:x1] = cv2.remap(mask, np.repeat(map_x, rows, 0), np.repeat(map_y, x1 - x0, 1), cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out

    def stripe(self, y0: int, rows: int) -> np.ndarray:
        rows = min(rows, self.height - y0)
        cell = self.cell
        tex = np.empty((rows, self.width, 3), np.uint8)
        for cy in range(y0 // cell, (y0 + rows - 1) // cell + 1):
            ty0, ty1 = max(cy * cell, y0), min((cy + 1) * cell, y0 + rows)
            for cx in range(0, -(-self.width // cell)):
                variant = self.variants[zlib.crc32(f"{self.seed},{cx},{cy}".encode()) % 8]
                tx1 = min((cx + 1) * cell, self.width)
                tex[ty0 - y0 : ty1 - y0, cx * cell : tx1] = variant[ty0 - cy * cell : ty1 - cy * cell, : tx1 - cx * cell]
        alpha = np.clip((self._sample(self.tissue, y0, rows) - 0.35) / 0.3, 0, 1)[..., None]
        rng = np.random.default_rng([self.seed, y0, self.width])
        glass = 236 + rng.integers(0, 8, size=(rows, self.width, 1), dtype=np.uint8)
        out = alpha * tex + (1 - alpha) * glass
        if self.pen.any():
            ink = np.clip(self._sample(self.pen, y0, rows) * 2, 0, 1)[..., None]
            out = ink * np.array([40, 70, 150], np.float32) + (1 - ink) * out
        return np.clip(out, 0, 255).astype(np.uint8)


def _encode_tiles(painter: _LevelPainter, tile: int, quality: int, rgb: bool, tables: bool):
    """Yield each tile's JPEG bytes, row-major; also records the shared tables."""
    import imagecodecs

    state = {"tables": None}

    def tiles():
        for y0 in range(0, painter.height, tile):
            stripe = painter.stripe(y0, tile)
            if stripe.shape[0] < tile or stripe.shape[1] % tile:
                padded = np.full((tile, -(-painter.width // tile) * tile, 3), 255, np.uint8)
                padded[: stripe.shape[0], : stripe.shape[1]] = stripe
                stripe = padded
            for x0 in range(0, stripe.shape[1], tile):
                block = np.ascontiguousarray(stripe[:, x0 : x0 + tile])
                if rgb:
                    data = imagecodecs.jpeg8_encode(block, level=quality, outcolorspace="RGB")
                else:
                    data = imagecodecs.jpeg8_encode(block, level=quality, subsampling="444")
                if tables:
                    shared, data = split_jpeg_tables(bytes(data))
                    state["tables"] = shared
                yield bytes(data)

    return tiles(), state


def make_sample_slide(
    path: str | Path,
    *,
    width: int = 8192,
    height: int = 6144,
    mpp: float | None = 0.25,
    kind: str = "svs",
    tile: int = 256,
    downsamples: tuple[int, ...] | None = None,
    stain: str = "he",
    tissue_fraction: float = 0.35,
    pen_marks: bool = False,
    empty: bool = False,
    associated: tuple[str, ...] | None = None,
    quality: int = 85,
    seed: int = 0,
) -> SampleSlide:
    """Write a realistic pyramidal, JPEG-tiled slide and return its ground truth.

    Parameters
    ----------
    path : str or Path
        Output file; written to a temporary name and renamed, so never half-written.
    width, height : int
        Level-0 size in pixels.
    mpp : float or None
        Level-0 µm/px stored in the metadata; ``None`` stores none (to test the error).
    kind : {"svs", "tiff", "ome"}
        ``svs``: Aperio dialect (``MPP =`` in the description, RGB-coded JPEG with
        shared ``JPEGTables``, thumbnail/label/macro pages), as OpenSlide's ``aperio``.
        ``tiff``: generic pyramidal TIFF, YCbCr JPEG, resolution in pixels/cm.
        ``ome``: OME-TIFF with sub-IFD pyramid and ``PhysicalSizeX``.
    downsamples : tuple of int
        Pyramid downsamples; default 1, 4, 16, ... (Aperio-like) down to ~512 px.
    stain : {"he", "ihc"}
        Source of the real texture.
    pen_marks : bool
        Draw a marker stroke on the glass (not part of the tissue mask).
    empty : bool
        Only glass, no tissue.
    associated : tuple of str or None
        Images written beside an ``svs`` pyramid, any of ``SVS_ASSOCIATED``: the
        stripped ``thumbnail`` as the second directory (Aperio's layout; without it
        level 1 follows level 0 directly), ``label`` and ``macro`` as the last
        directories. ``None``: all three for ``svs``, none for the other kinds.
    """
    import tifffile

    path = Path(path)
    if kind not in ("svs", "tiff", "ome"):
        raise ValueError(f"unknown sample kind {kind!r}; use 'svs', 'tiff' or 'ome'")
    if associated is None:
        associated = SVS_ASSOCIATED if kind == "svs" else ()
    unknown = set(associated) - set(SVS_ASSOCIATED)
    if unknown or (associated and kind != "svs"):
        raise ValueError(f"associated={associated!r}: only kind='svs' has associated images, "
                         f"any of {SVS_ASSOCIATED}")
    rng = np.random.default_rng(seed)
    physical = mpp if mpp is not None else 0.25
    mask_w = max(8, round(width * physical / MASK_MPP))
    mask_h = max(8, round(height * physical / MASK_MPP))
    tissue = np.zeros((mask_h, mask_w), bool) if empty else _tissue_mask(rng, mask_w, mask_h, tissue_fraction)
    pen = _pen_mask(rng, tissue) if pen_marks else np.zeros_like(tissue)
    if downsamples is None:
        downsamples = [1]
        while max(width, height) / (downsamples[-1] * 4) >= 512:
            downsamples.append(downsamples[-1] * 4)
    downsamples = tuple(int(d) for d in downsamples)
    texture = sample_texture(stain)

    def painter(ds: int) -> _LevelPainter:
        return _LevelPainter(texture=texture, downsample=ds, mpp=physical, tissue=tissue, pen=pen,
                             seed=seed, width=width // ds, height=height // ds)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "ome":
            _write_ome(tmp, painter, downsamples, tile, quality, mpp)
        else:
            _write_tiff(tmp, painter, downsamples, tile, quality, mpp, kind, width, height, associated)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    del tifffile
    return SampleSlide(path=path, mpp=mpp, dimensions=(width, height), downsamples=downsamples, tissue_mask=tissue)


def _write_tiff(tmp, painter, downsamples, tile, quality, mpp, kind, width, height, associated) -> None:
    import cv2
    import tifffile

    svs = kind == "svs"
    bigtiff = width * height * 3 > 2**31
    overview = None
    if "thumbnail" in associated or "macro" in associated:
        # The whole slide at most 768 px across, from the coarsest level: the thumbnail
        # page and the slide area of the macro photograph.
        overview = painter(downsamples[-1]).stripe(0, height)
        scale = min(1.0, 768 / max(overview.shape[:2]))
        overview = cv2.resize(overview, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for index, ds in enumerate(downsamples):
            level = painter(ds)
            tiles, state = _encode_tiles(level, tile, quality, rgb=svs, tables=True)
            first = next(tiles)
            tables = state["tables"]

            def chain(first=first, tiles=tiles):
                yield first
                yield from tiles

            if svs:
                if index == 0:
                    description = (
                        f"{_APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                        f"JPEG/RGB Q={quality}|AppMag = {40 if (mpp or 0.25) < 0.4 else 20}"
                        + (f"|MPP = {mpp:.4f}" if mpp is not None else "")
                        + "|ScanScope ID = HISTOSCOPE|Filename = sample"
                    )
                else:
                    description = (
                        f"{_APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                        f"-> {level.width}x{level.height} JPEG/RGB Q={quality}"
                    )
            else:
                description = None
            resolution = None
            if mpp is not None and not svs:
                per_cm = 1e4 / (mpp * ds)
                resolution = (per_cm, per_cm)
            tif.write(
                chain(),
                shape=(level.height, level.width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression=7,
                photometric="rgb" if svs else "ycbcr",
                subsampling=(1, 1) if not svs else None,
                jpegtables=tables,
                description=description,
                resolution=resolution,
                resolutionunit="CENTIMETER" if resolution else None,
                # Aperio marks pyramid levels as full-resolution pages (tifffile and
                # OpenSlide rely on that); generic pyramids flag them as reduced.
                subfiletype=0 if (index == 0 or svs) else 1,
                compressionargs={"outcolorspace": "RGB"} if svs else None,
                metadata=None,
            )
            if index == 0 and "thumbnail" in associated:
                # Aperio keeps a stripped thumbnail as the second directory.
                tif.write(overview, photometric="rgb", compression="jpeg", metadata=None,
                          description=f"{_APERIO_HEADER}\r\n{width}x{height} -> {overview.shape[1]}x{overview.shape[0]} - ")
        # Label and macro are told apart by NewSubfileType (1, 9), as OpenSlide does, and
        # named on the second line of their description, as Aperio writes them.
        if "label" in associated:
            label = np.full((400, 400, 3), 250, np.uint8)
            label[60:340:8, 40:360] = 20  # a barcode-like pattern
            tif.write(label, photometric="rgb", compression="lzw", metadata=None, subfiletype=1,
                      description=f"{_APERIO_HEADER}\r\nlabel 400x400")
        if "macro" in associated:
            macro = np.full((430, 1280, 3), 215, np.uint8)
            glass = overview[:430, :880]
            macro[: glass.shape[0], 400 : 400 + glass.shape[1]] = glass
            tif.write(macro, photometric="rgb", compression="jpeg", metadata=None, subfiletype=9,
                      description=f"{_APERIO_HEADER}\r\nmacro 1280x430")


def _write_ome(tmp, painter, downsamples, tile, quality, mpp) -> None:
    import tifffile

    levels = [painter(ds).stripe(0, painter(ds).height) for ds in downsamples]
    metadata = {"axes": "YXS"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    options = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality}, photometric="rgb")
    with tifffile.TiffWriter(tmp, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)


def make_sample_tiles(root: str | Path, *, per_class: int = 12, size: int = 128, seed: int = 0) -> dict[str, int]:
    """A labelled tile set ``ROOT/<class>/*.png`` cut from sample slides, for evaluating encoders.

    Three visually distinct classes: ``he`` (H&E tissue), ``ihc`` (IHC tissue) and
    ``glass`` (background), ``per_class`` tiles of ``size`` px each, read at level 0
    from where the slides' ground-truth mask is all tissue (or all glass). Returns
    ``{class: tiles written}``.
    """
    import tempfile

    from PIL import Image

    from histoscope.io.atomic import atomic_path
    from histoscope.io.open import open_slide

    root = Path(root)
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    scratch = tempfile.TemporaryDirectory(prefix="histoscope_tiles_")
    for stain in ("he", "ihc"):
        sample = make_sample_slide(Path(scratch.name) / f"{stain}.tiff", width=2048, height=2048, mpp=0.25,
                                   kind="tiff", stain=stain, tissue_fraction=0.5, seed=seed + (stain == "ihc"))
        cell = sample.mask_mpp / sample.mpp  # level-0 px per mask pixel
        span = int(np.ceil(size / cell))  # mask pixels a tile covers
        mask = sample.tissue_mask
        for label, wanted in ((stain, True), ("glass", False)):
            if label == "glass" and stain != "he":
                continue
            corners = [(y, x) for y in range(mask.shape[0] - span) for x in range(mask.shape[1] - span)
                       if (mask[y : y + span + 1, x : x + span + 1] == wanted).all()]
            picked = rng.permutation(len(corners))[:per_class]
            with open_slide(sample.path) as slide:
                for i, c in enumerate(picked):
                    y, x = corners[c]
                    tile = slide.read_region((int(x * cell), int(y * cell)), 0, (size, size))
                    with atomic_path(root / label / f"{label}_{i:03d}.png") as tmp:
                        Image.fromarray(tile).save(tmp, format="png")
            counts[label] = len(picked)
    scratch.cleanup()
    return counts
