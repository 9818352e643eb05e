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

__all__ = ["percentile_scores", "colorize", "paint_heatmap", "tiles_geojson", "write_tile_scores"]

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
