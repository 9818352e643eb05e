"""Per-tile scores as pictures and shapes: a heatmap over the thumbnail, a tile CSV, QuPath GeoJSON.

Scores are shown by percentile within the slide (CLAM's convention): raw attention
weights shrink with the number of tiles and are dominated by a few tiles, so ranks
show where a model looks far better than raw values. Raw values are kept in the CSV
and in the GeoJSON measurements.

Notation: N tiles; coords are level-0 (x, y) of each tile's top-left corner.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from histoscope.io.atomic import atomic_path

__all__ = ["percentile_scores", "colorize", "colorbar_geometry", "colorbar_values", "paint_heatmap", "tiles_geojson", "with_colorbar",
           "write_tile_scores"]

_BUCKETS = 10  # QuPath classes "attention 0-10%" … "attention 90-100%", one colour each


def percentile_scores(scores: np.ndarray) -> np.ndarray:
    """(N,) scores → (N,) in [0, 1] by rank (ties share their mean rank); 1 for a single tile."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) <= 1:
        return np.ones(len(scores))
    return (rankdata(scores) - 1) / (len(scores) - 1)


def colorize(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(N,) values in [0, 1] → (N, 3) uint8 RGB."""
    from matplotlib import colormaps

    return (colormaps[cmap](np.clip(values, 0, 1))[:, :3] * 255).round().astype(np.uint8)


def paint_heatmap(thumbnail: np.ndarray, coords: np.ndarray, size_level0: float,
                  dimensions: tuple[int, int], values: np.ndarray, *, cmap: str = "jet",
                  alpha: float = 0.5) -> np.ndarray:
    """Blend each tile's colour over its rectangle of the thumbnail (overlaps are averaged).

    Parameters
    ----------
    thumbnail : (h, w, 3) uint8
    coords : (N, 2) level-0 (x, y)
    size_level0 : float
        Tile edge in level-0 pixels.
    dimensions : (W, H)
        Level-0 size of the slide.
    values : (N,) in [0, 1]

    Returns
    -------
    (h, w, 3) uint8
    """
    height, width = thumbnail.shape[:2]
    scale_x, scale_y = width / dimensions[0], height / dimensions[1]
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for (x, y), value in zip(np.asarray(coords, dtype=np.float64), values):
        x0, y0 = int(np.floor(x * scale_x)), int(np.floor(y * scale_y))
        x1 = max(x0 + 1, int(np.ceil((x + size_level0) * scale_x)))
        y1 = max(y0 + 1, int(np.ceil((y + size_level0) * scale_y)))
        total[max(0, y0) : y1, max(0, x0) : x1] += value
        count[max(0, y0) : y1, max(0, x0) : x1] += 1
    covered = count > 0
    out = thumbnail.astype(np.float64).copy()
    colours = colorize(total[covered] / count[covered], cmap).astype(np.float64)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours
    return out.round().clip(0, 255).astype(np.uint8)


def colorbar_values(height: int) -> np.ndarray:
    """(height,) the value each row of a colour bar shows: 1 at the top, 0 at the bottom."""
    return 1 - (np.arange(height) + 0.5) / height


def _font(height: int):
    from PIL import ImageFont

    size = int(np.clip(height // 60, 10, 36))
    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType); Pillow >= 10.1
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def colorbar_geometry(height: int, label: str = "score percentile") -> tuple[int, int, int, int, int]:
    """``(top, bar height, left pad, bar width, panel width)`` of the colour bar beside an image
    ``height`` px tall: the bar is 80% of the height; the panel holds the tick labels and, above
    the bar, ``label``, in a font scaled with the image."""
    font = _font(height)
    bar = max(1, round(height * 0.8))
    top = (height - bar) // 2
    bar_width = int(np.clip(height // 25, 8, 40))
    pad = 8
    ticks = pad + bar_width + 6 + int(np.ceil(font.getlength("100%"))) + pad
    return top, bar, pad, bar_width, max(ticks, int(np.ceil(font.getlength(label))) + 2 * pad)


def with_colorbar(image: np.ndarray, *, cmap: str = "jet", label: str = "score percentile") -> np.ndarray:
    """``image`` (h, w, 3) uint8 with a colour bar on a white panel to its right: the colours of
    :func:`paint_heatmap` from 100% (top) to 0% (bottom), ticks at 0, 50 and 100% and ``label``.

    Returns
    -------
    (h, w + panel, 3) uint8; the bar spans rows ``top … top + bar`` at columns
    ``w + pad … w + pad + bar width`` (see :func:`colorbar_geometry`).
    """
    from PIL import Image, ImageDraw

    height = image.shape[0]
    top, bar, pad, bar_width, panel_width = colorbar_geometry(height, label)
    font = _font(height)
    panel = np.full((height, panel_width, 3), 255, dtype=np.uint8)
    panel[top : top + bar, pad : pad + bar_width] = colorize(colorbar_values(bar), cmap)[:, None, :]
    canvas = Image.fromarray(panel)
    draw = ImageDraw.Draw(canvas)
    right = pad + bar_width
    for fraction, text in ((1.0, "100%"), (0.5, "50%"), (0.0, "0%")):
        y = top + round((1 - fraction) * (bar - 1))
        draw.line([(right, y), (right + 3, y)], fill=(0, 0, 0))
        draw.text((right + 6, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((pad, top - 4), label, fill=(0, 0, 0), font=font, anchor="ld")
    return np.concatenate([image, np.asarray(canvas)], axis=1)


def tiles_geojson(coords: np.ndarray, size_level0: float, scores: np.ndarray, *,
                  object_type: str = "tile", cmap: str = "jet", measurement: str = "attention") -> dict[str, Any]:
    """A FeatureCollection of square tile polygons (level-0 pixels) that QuPath imports.

    Each tile is classified into a score decile (``"attention 90-100%"``) whose colour
    is the heatmap's colour there, so QuPath draws the same picture; the raw score and
    its percentile are measurements.
    """
    coords = np.asarray(coords, dtype=np.float64)
    percentiles = percentile_scores(scores)
    buckets = np.minimum((percentiles * _BUCKETS).astype(int), _BUCKETS - 1)
    colours = colorize((buckets + 0.5) / _BUCKETS, cmap)
    size = float(size_level0)
    features = []
    for (x, y), score, percentile, bucket, colour in zip(coords, scores, percentiles, buckets, colours):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        low = 100 // _BUCKETS * bucket
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in ring]]},
            "properties": {
                "objectType": object_type,
                "measurements": {measurement: float(score), f"{measurement}_percentile": float(percentile)},
                "classification": {"name": f"{measurement} {low}-{low + 100 // _BUCKETS}%",
                                   "color": [int(c) for c in colour]},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_tile_scores(path: str | Path, coords: np.ndarray, scores: np.ndarray) -> None:
    """CSV ``x, y, score, percentile`` (level-0 top-left corner), one row per tile."""
    percentiles = percentile_scores(scores)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "score", "percentile"])
        for (x, y), score, percentile in zip(np.asarray(coords), scores, percentiles):
            writer.writerow([int(x), int(y), repr(float(score)), repr(float(percentile))])
