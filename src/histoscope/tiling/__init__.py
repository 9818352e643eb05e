"""Tile grids at exact microns and the patch-coordinate files they are stored in."""

from histoscope.tiling.geometry import DEFAULT_MPP, DEFAULT_SIZE, TileGeometry
from histoscope.tiling.grid import DEFAULT_MIN_TISSUE, TileGrid, tile_grid
from histoscope.tiling.patches_h5 import find_patches, patches_path, read_patches, write_patches

__all__ = ["DEFAULT_MIN_TISSUE", "DEFAULT_MPP", "DEFAULT_SIZE", "TileGeometry", "TileGrid", "find_patches",
           "patches_path", "read_patches", "tile_grid", "write_patches"]
