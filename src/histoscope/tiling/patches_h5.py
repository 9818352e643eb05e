"""``OUT/patches/<slide>_patches.h5``: the tile coordinates, readable by TRIDENT and CLAM.

Dataset ``coords`` (N, 2) int64 holds level-0 (x, y). Its attributes carry both
TRIDENT's names (``patch_size``, ``patch_size_level0``, ``level0_width``,
``level0_height``, ``overlap``, magnifications) and CLAM's (``patch_level``,
``downsample``, ``level_dim``, ``downsampled_level_dim``), plus the exact
resolutions (``target_mpp``, ``level0_mpp``). ``tissue_fraction`` (N,) float32 sits
beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoscope.io.atomic import atomic_path
from histoscope.tiling.grid import TileGrid

__all__ = ["write_patches", "read_patches", "patches_path", "clam_patches_path", "find_patches", "FORMAT_VERSION"]

FORMAT_VERSION = 1
# Objective magnification conventionally equivalent to 1 µm/px divided by it
# (20x ≈ 0.5 µm/px); only written for readers that expect magnifications.
_MAG_UM = 10.0


def patches_path(out_dir: str | Path, slide_name: str) -> Path:
    """``OUT/patches/<slide>_patches.h5``, as histoscope and TRIDENT name it."""
    return Path(out_dir) / "patches" / f"{slide_name}_patches.h5"


def clam_patches_path(out_dir: str | Path, slide_name: str) -> Path:
    """``OUT/patches/<slide>.h5``, as CLAM names it."""
    return Path(out_dir) / "patches" / f"{slide_name}.h5"


def find_patches(out_dir: str | Path, slide_name: str) -> Path:
    """The slide's patches file in ``out_dir``: ours (or TRIDENT's), else CLAM's if only that exists."""
    path = patches_path(out_dir, slide_name)
    clam = clam_patches_path(out_dir, slide_name)
    return clam if not path.exists() and clam.exists() else path


def write_patches(path: str | Path, grid: TileGrid, *, slide_name: str, slide_path: str = "", extra: dict | None = None) -> Path:
    """Write ``grid`` to ``path`` atomically (temp file, then rename). ``slide_path`` is stored
    absolute, so later stages (embed, predict, pretrain) find the slide from any directory."""
    import os

    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            coords = f.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
            geometry = grid.geometry
            width, height = grid.level0_size
            attrs = {
                # TRIDENT (patch_size, patch_size_level0) and histoscope (exact resolutions, read level)
                **geometry.attrs(),
                "level0_width": width,
                "level0_height": height,
                "overlap": grid.overlap,
                "target_magnification": _MAG_UM / geometry.mpp,
                "level0_magnification": _MAG_UM / geometry.level0_mpp,
                "name": slide_name,
                "slide_path": os.path.abspath(slide_path) if slide_path else "",
                "histoscope_format": FORMAT_VERSION,
                # CLAM: tiles are `patch_size_level0` px at level 0 resized to patch_size
                "patch_level": 0,
                "downsample": np.array([geometry.size_level0 / geometry.size] * 2, dtype=np.float64),
                "level_dim": np.array([width, height], dtype=np.int64),
                "downsampled_level_dim": np.array([width, height], dtype=np.int64),
            }
            attrs.update(extra or {})
            for key, value in attrs.items():
                coords.attrs[key] = value
            f.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, dtype=np.float32))
    return path


def read_patches(path: str | Path) -> tuple[np.ndarray, dict]:
    """``(coords (N, 2) int64, attributes)`` of a patches file (ours, TRIDENT's or CLAM's)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise KeyError(f"{path}: no 'coords' dataset; is this a patches file?")
        coords = f["coords"][:].astype(np.int64)
        attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f["coords"].attrs.items()}
        if "tissue_fraction" in f:
            attrs["tissue_fraction"] = f["tissue_fraction"][:]
    return coords, attrs
