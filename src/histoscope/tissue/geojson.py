"""Tissue polygons as GeoJSON that QuPath imports as annotations.

QuPath reads a FeatureCollection whose features carry ``objectType`` and a
``classification`` (name and RGB colour) in their properties; coordinates are
level-0 pixels with y down, which is what QuPath uses for image space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histoscope.tissue.mask import Polygon

__all__ = ["polygons_to_geojson", "geojson_to_polygons"]

# Hundredths of a level-0 pixel: far below anything visible, and keeps files small.
_DECIMALS = 2


def _closed_ring(ring: np.ndarray) -> list[list[float]]:
    ring = np.round(np.asarray(ring, dtype=np.float64), _DECIMALS)
    return np.concatenate([ring, ring[:1]]).tolist()  # GeoJSON rings repeat the first vertex


def polygons_to_geojson(
    polygons: Sequence[Polygon], *, name: str = "Tissue", color: tuple[int, int, int] = (0, 200, 0)
) -> dict[str, Any]:
    """One Polygon feature per tissue piece; an empty FeatureCollection for none."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_closed_ring(ring) for ring in polygon.rings]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": [int(c) for c in color]},
            },
        }
        for polygon in polygons
    ]
    return {"type": "FeatureCollection", "features": features}


def geojson_to_polygons(collection: dict[str, Any]) -> list[Polygon]:
    """Read back Polygon/MultiPolygon features (e.g. tissue outlines edited in QuPath)."""
    polygons = []
    for feature in collection.get("features", []):
        geometry = feature["geometry"]
        if geometry["type"] == "Polygon":
            parts = [geometry["coordinates"]]
        elif geometry["type"] == "MultiPolygon":
            parts = geometry["coordinates"]
        else:
            raise ValueError(f"unsupported geometry {geometry['type']!r}; expected Polygon or MultiPolygon")
        for rings in parts:
            arrays = [np.asarray(r, dtype=np.float64)[:-1] for r in rings]  # drop the repeated vertex
            polygons.append(Polygon(exterior=arrays[0], holes=tuple(arrays[1:])))
    return polygons
