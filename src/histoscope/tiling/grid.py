"""Tile coordinates at an exact physical resolution.

The grid starts at the level-0 origin and steps by the tile's level-0 size (see
:class:`~histoscope.tiling.geometry.TileGeometry`), so coordinates are reproducible
and on pyramids with a level at the target resolution each tile is one stored tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoscope.io.slide import Slide
from histoscope.tiling.geometry import DEFAULT_MPP, DEFAULT_SIZE, TileGeometry

__all__ = ["TileGrid", "tile_grid", "DEFAULT_MIN_TISSUE"]

# Prov-GigaPath keeps a 256-px tile when at least 10% of it is foreground
# (`occupancy_threshold=0.1` in its tiling pipeline).
DEFAULT_MIN_TISSUE = 0.1


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of one slide and the geometry that produced them."""

    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    tissue_fraction: np.ndarray  # (N,) float32 in [0, 1]
    geometry: TileGeometry
    level0_size: tuple[int, int]  # the slide's level-0 (width, height)
    overlap: int  # px at the target resolution shared by neighbouring tiles

    def __len__(self) -> int:
        return len(self.coords)


def tile_grid(
    slide: Slide,
    tissue=None,
    *,
    size: int = DEFAULT_SIZE,
    mpp: float = DEFAULT_MPP,
    overlap: int = 0,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> TileGrid:
    """Tiles of ``size`` px at ``mpp`` µm/px whose tissue fraction is ``>= min_tissue``.

    Parameters
    ----------
    slide : Slide
    tissue : TissueMask or None
        Segmentation to filter by; ``None`` keeps every tile of the slide.
    size : int
        Tile edge in px at the target resolution.
    mpp : float
        Target resolution in µm/px.
    overlap : int
        Pixels (at the target resolution) shared by neighbouring tiles.
    min_tissue : float
        Minimum tissue fraction of a kept tile, in [0, 1].
    """
    geometry = TileGeometry.for_slide(slide, size=size, mpp=mpp)
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap} for size {size}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    width, height = slide.dimensions
    step = (size - overlap) * mpp / geometry.level0_mpp  # level-0 px
    xs = np.round(np.arange(0, width, step)).astype(np.int64)
    ys = np.round(np.arange(0, height, step)).astype(np.int64)
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)  # row-major: y, then x
    if tissue is None:
        fraction = np.ones(len(grid), np.float32)
    else:
        fraction = tissue.tissue_fraction(grid, geometry.size_level0).astype(np.float32)
    keep = fraction >= min_tissue
    return TileGrid(coords=grid[keep], tissue_fraction=fraction[keep], geometry=geometry,
                    level0_size=(width, height), overlap=overlap)
