"""The result of tissue segmentation: a low-resolution mask tied to level-0 coordinates.

Notation: ``h, w`` mask rows/columns; ``N`` tiles; ``K`` ring vertices. Coordinates
are ``(x, y)`` in level-0 pixels, as everywhere in histoscope, unless a name says
``mask``. Mask pixel ``(i, j)`` covers the level-0 square
``[j * downsample, (j + 1) * downsample) x [i * downsample, (i + 1) * downsample)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Polygon", "TissueMask"]

# Where the geometry is kept in the mask PNG, so the mask alone is a stage output.
_PNG_KEY = "histoscope.tissue"


@dataclass(frozen=True)
class Polygon:
    """One tissue piece: its outline and the outlines of its holes.

    Rings are open (the first vertex is not repeated), in level-0 pixels, and run
    along the tissue edge itself (half-way between tissue and glass mask pixels).
    The exterior has positive signed (shoelace) area in ``(x, y)``, holes negative,
    as RFC 7946 asks of GeoJSON.
    """

    exterior: np.ndarray  # (K, 2) float64 x, y
    holes: tuple[np.ndarray, ...] = ()  # each (K, 2) float64 x, y

    @property
    def rings(self) -> tuple[np.ndarray, ...]:
        return (self.exterior, *self.holes)


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an open ring (K, 2) x, y: positive counter-clockwise in (x, y)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1])


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask at ``mpp`` µm/px and how it maps onto the slide.

    Attributes
    ----------
    mask : (h, w) bool
        True where there is tissue.
    mpp : float
        µm per mask pixel.
    downsample : float
        Level-0 pixels per mask pixel (the same along x and y).
    level0_size : (int, int)
        ``(width, height)`` of slide level 0; the mask may overhang it by less than a
        mask pixel where the slide size is not a multiple of ``downsample``.
    """

    mask: np.ndarray
    mpp: float
    downsample: float
    level0_size: tuple[int, int]

    @property
    def area_um2(self) -> float:
        """Tissue area in µm²."""
        return float(np.count_nonzero(self.mask)) * self.mpp**2

    def contours(self, *, tolerance: float = 0.25) -> list[Polygon]:
        """Tissue pieces as polygons with holes, in level-0 pixels.

        Parameters
        ----------
        tolerance : float
            Largest distance, in mask pixels, a simplified ring may stray from the
            traced one; ``0.25`` only drops vertices on straight runs.

        Returns
        -------
        list of Polygon
            One per 8-connected tissue piece; a piece lying inside another's hole is
            its own polygon.
        """
        import cv2
        from skimage.measure import find_contours

        # Padding closes rings that touch the mask edge. Marching squares at 0.5 puts
        # rings on the true tissue edge, so outlines and holes are treated alike
        # (pixel-centre tracing would shrink tissue and grow holes by half a pixel).
        padded = np.pad(self.mask, 1).astype(np.uint8)
        # Tissue pieces, 8-connected as the contours below treat them: (h + 2, w + 2) int32, 0 glass.
        _, pieces = cv2.connectedComponents(padded, connectivity=8)
        exteriors: list[np.ndarray] = []
        holes: list[np.ndarray] = []
        exterior_pieces: list[int] = []
        hole_pieces: list[int] = []
        for traced in find_contours(padded.astype(np.float32), 0.5, fully_connected="high",
                                    positive_orientation="high"):
            piece = _piece_of(traced, pieces)
            ring = traced[:-1, ::-1] - 1.0  # (K, 2) x, y in mask pixel-centre units, open
            if tolerance > 0 and len(ring) > 3:
                ring = cv2.approxPolyDP(ring.astype(np.float32)[:, None], tolerance, True)[:, 0].astype(np.float64)
            if len(ring) < 3:
                continue
            # With positive_orientation="high" tissue outlines come out with negative
            # shoelace area in (x, y) and hole outlines positive; flip both for RFC 7946.
            if _signed_area(ring) < 0:
                exteriors.append(ring[::-1])
                exterior_pieces.append(piece)
            else:
                holes.append(ring[::-1])
                hole_pieces.append(piece)
        parents = self._assign_holes(exterior_pieces, hole_pieces)
        children: list[list[int]] = [[] for _ in exteriors]
        for k, parent in enumerate(parents):
            if parent >= 0:
                children[parent].append(k)
        scale = self.downsample
        return [
            Polygon(exterior=(ext + 0.5) * scale, holes=tuple((holes[k] + 0.5) * scale for k in children[i]))
            for i, ext in enumerate(exteriors)
        ]

    @staticmethod
    def _assign_holes(exterior_pieces: list[int], hole_pieces: list[int]) -> list[int]:
        """Index of the exterior around each hole (-1 if none, which a padded mask cannot
        produce), given the tissue piece each ring bounds.

        A hole is glass inside one tissue piece, and its ring runs along that piece only
        (pieces lying in the hole are rings of their own), so its parent is the exterior
        of the same piece: one dictionary lookup per hole, where testing holes against
        exteriors would be quadratic in their number (thousands on a noisy mask).
        """
        exterior_of = {piece: i for i, piece in enumerate(exterior_pieces)}
        return [exterior_of.get(piece, -1) for piece in hole_pieces]
    def to_geojson(self, *, name: str = "Tissue", color: tuple[int, int, int] = (0, 200, 0)) -> dict[str, Any]:
        """A GeoJSON FeatureCollection QuPath imports as annotations (level-0 pixels)."""
        from histoscope.tissue.geojson import polygons_to_geojson

        return polygons_to_geojson(self.contours(), name=name, color=color)

    def tissue_fraction(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Fraction of each level-0 square covered by tissue, exact for the mask.

        Parameters
        ----------
        coords : (N, 2) number
            Level-0 ``(x, y)`` of each square's top-left corner.
        size_level0 : float
            Square edge in level-0 pixels.

        Returns
        -------
        (N,) float32 in [0, 1]
            Parts of a square outside the slide count as glass; mask pixels cut by a
            square's edge count by the area inside it.
        """
        if not size_level0 > 0:
            raise ValueError(f"size_level0 must be positive, got {size_level0!r}")
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        # integral[i, j] = tissue pixels in rows < i and columns < j: (h + 1, w + 1).
        integral = np.zeros((h + 1, w + 1), np.float64)
        integral[1:, 1:] = self.mask.cumsum(0, dtype=np.float64).cumsum(1)
        x_max = min(self.level0_size[0] / self.downsample, w)  # in mask pixels
        y_max = min(self.level0_size[1] / self.downsample, h)
        u0 = np.clip(coords[:, 0] / self.downsample, 0, x_max)
        u1 = np.clip((coords[:, 0] + size_level0) / self.downsample, 0, x_max)
        v0 = np.clip(coords[:, 1] / self.downsample, 0, y_max)
        v1 = np.clip((coords[:, 1] + size_level0) / self.downsample, 0, y_max)
        inside = (
            _integral_at(integral, u1, v1) - _integral_at(integral, u0, v1)
            - _integral_at(integral, u1, v0) + _integral_at(integral, u0, v0)
        )
        return np.clip(inside / (size_level0 / self.downsample) ** 2, 0.0, 1.0).astype(np.float32)

    # ---- persistence --------------------------------------------------------------
    def save_png(self, path: str | Path) -> None:
        """Write the mask as a 0/255 PNG (atomically) with its geometry in a text chunk."""
        from PIL import Image, PngImagePlugin

        from histoscope.io.atomic import atomic_path

        info = PngImagePlugin.PngInfo()
        geometry = {"mpp": self.mpp, "downsample": self.downsample, "level0_size": list(self.level0_size)}
        info.add_text(_PNG_KEY, json.dumps(geometry))
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, pnginfo=info)

    @classmethod
    def load_png(cls, path: str | Path) -> "TissueMask":
        """Read a mask written by :meth:`save_png`."""
        from PIL import Image

        with Image.open(path) as image:
            text = image.info.get(_PNG_KEY)
            if text is None:
                raise ValueError(f"{path}: not a histoscope tissue mask (no {_PNG_KEY!r} text chunk)")
            mask = np.asarray(image.convert("L")) > 127
        geometry = json.loads(text)
        return cls(mask=mask, mpp=float(geometry["mpp"]), downsample=float(geometry["downsample"]),
                   level0_size=tuple(int(v) for v in geometry["level0_size"]))


def _piece_of(ring: np.ndarray, pieces: np.ndarray) -> int:
    """The tissue piece a traced ring bounds: the label of the tissue pixel beside its
    first vertex. ``ring`` (K, 2) is in (row, col) of ``pieces``; marching squares at 0.5
    on a 0/1 image puts each vertex half-way between a tissue and a glass pixel."""
    row, col = ring[0]
    first = pieces[int(np.floor(row)), int(np.floor(col))]
    second = pieces[int(np.ceil(row)), int(np.ceil(col))]
    return int(max(first, second))


def _integral_at(integral: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The integral image at fractional (u, v) = (column, row) boundaries.

    The integral of a piecewise-constant image is bilinear inside each pixel, so
    bilinear interpolation of the corner sums is exact, not an approximation.
    """
    h1, w1 = integral.shape
    j = np.clip(np.floor(u).astype(np.int64), 0, w1 - 2)
    i = np.clip(np.floor(v).astype(np.int64), 0, h1 - 2)
    fu, fv = u - j, v - i
    top = integral[i, j] * (1 - fu) + integral[i, j + 1] * fu
    bottom = integral[i + 1, j] * (1 - fu) + integral[i + 1, j + 1] * fu
    return top * (1 - fv) + bottom * fv
