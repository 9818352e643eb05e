"""Tile coordinates at an exact physical resolution.

A tile of ``size`` px at ``mpp`` µm/px covers ``size * mpp / level0_mpp`` level-0
pixels (``patch_size_level0``), whatever the scanner's magnification: 256 px at
0.5 µm/px is 512 level-0 px on a 0.25 µm/px slide and 256 on a 0.5 µm/px one. The
grid starts at the level-0 origin, so coordinates are reproducible and on
pyramids with a level at the target resolution each tile is one stored tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoscope.io.slide import Slide

__all__ = ["TileGrid", "tile_grid", "DEFAULT_MIN_TISSUE"]

# Prov-GigaPath keeps a 256-px tile when at least 10% of it is foreground
# (`occupancy_threshold=0.1` in its tiling pipeline).
DEFAULT_MIN_TISSUE = 0.1


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of one slide and the geometry that produced them."""

    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    tissue_fraction: np.ndarray  # (N,) float32 in [0, 1]
    patch_size: int  # tile edge in px at the target resolution
    patch_size_level0: int  # tile edge in level-0 px
    target_mpp: float
    level0_mpp: float
    level0_size: tuple[int, int]
    overlap: int  # px at the target resolution shared by neighbouring tiles
    read_level: int  # pyramid level tiles are read from
    read_size: int  # px read at that level before resizing to patch_size

    def __len__(self) -> int:
        return len(self.coords)


def tile_grid(
    slide: Slide,
    tissue=None,
    *,
    size: int = 256,
    mpp: float = 0.5,
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
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap} for size {size}")
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    level0_mpp = slide.mpp
    width, height = slide.dimensions
    scale = mpp / level0_mpp  # level-0 px per target px
    patch_level0 = max(1, round(size * scale))
    step = (size - overlap) * scale
    xs = np.round(np.arange(0, width, step)).astype(np.int64)
    ys = np.round(np.arange(0, height, step)).astype(np.int64)
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)  # row-major: y, then x
    if tissue is None:
        fraction = np.ones(len(grid), np.float32)
    else:
        fraction = tissue.tissue_fraction(grid, patch_level0).astype(np.float32)
    keep = fraction >= min_tissue
    level, read, _ = slide.tile_geometry(size, mpp)
    return TileGrid(
        coords=grid[keep],
        tissue_fraction=fraction[keep],
        patch_size=size,
        patch_size_level0=patch_level0,
        target_mpp=float(mpp),
        level0_mpp=float(level0_mpp),
        level0_size=(width, height),
        overlap=overlap,
        read_level=level,
        read_size=read,
    )
