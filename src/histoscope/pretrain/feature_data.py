"""Samples streamed from features files (``OUT/features_<encoder>/<slide>.h5``) for slide-level objectives.

Two kinds of sample, drawn by the same :class:`~histoscope.pretrain.data.StepStream` as tiles
(same order, shuffle buffer, sharding over ranks and workers, resumption):

* :class:`SlideFeatureIndex`: one sample per slide, ``{"features" (N, D), "coords" (N, 2)}``
  (slide-level MAE);
* :class:`RegionFeatureIndex`: one sample per ``G x G`` region of tiles (HIPT's 4096-px
  regions of 256-px tiles), ``(G, G, D)`` float32 grids, cell ``[row, col]``; cells
  without a tile hold zeros, tiles sharing a cell are averaged (as
  :func:`histoscope.slide.models.hipt.region_grids` places them). Regions with fewer than
  ``min_tiles`` tiles are left out.

Indexing reads only shapes, coordinates and attributes; features are read when a sample
is drawn, one slide at a time (a few recently read slides are kept for regions).

Notation: N tiles of a slide, D tile-embedding dim, G tiles per region edge.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureSlide", "RegionFeatureIndex", "SlideFeatureIndex", "find_feature_slides", "region_keys",
           "with_tile_size"]


@dataclass(frozen=True)
class FeatureSlide:
    """One features file: where it is, its size and the level-0 edge of its tiles."""

    name: str
    path: str
    num_tiles: int
    dim: int
    tile_size: float  # level-0 px per tile: the grid step of ``coords``


def _feature_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such features file or folder (give `histoscope embed`'s "
                                "OUT/features_<encoder> folder or its .h5 files in data.features)")
    return sorted(path.glob("*.h5"))


def find_feature_slides(paths: Sequence[str | Path], *, log: Callable[[str], None] = print) -> list[FeatureSlide]:
    """The features files under ``paths`` (files or folders); empty or unreadable files are reported and skipped."""
    import h5py

    from histoscope.io.features_h5 import read_coords_attrs
    from histoscope.tiling import TileGeometry

    files = [f for p in paths for f in _feature_files(Path(p))]
    if not files:
        raise FileNotFoundError(f"no features files (*.h5) in {', '.join(map(str, paths))}; run `histoscope embed`")
    found, skipped = [], []
    for file in files:
        try:
            with h5py.File(file, "r") as f:
                n, dim = f["features"].shape
            geometry = TileGeometry.from_attrs(read_coords_attrs(file))
        except (OSError, KeyError, ValueError) as error:
            skipped.append(f"{file}: not a readable features file with tile geometry ({error})")
            log(f"skipping {skipped[-1]}")
            continue
        if n == 0:
            skipped.append(f"{file}: no tiles")
            log(f"skipping {skipped[-1]}")
            continue
        found.append(FeatureSlide(name=file.stem, path=str(file), num_tiles=int(n), dim=int(dim),
                                  tile_size=float(geometry.size_level0)))
    if not found:
        raise FileNotFoundError(f"none of the {len(files)} features files has tiles and tile geometry (first: "
                                f"{skipped[0]}); give the OUT/features_<encoder> folder `histoscope embed` wrote")
    dims = {s.dim for s in found}
    if len(dims) > 1:
        raise ValueError(f"the features files mix embedding sizes {sorted(dims)}: give files of one encoder")
    return found


def with_tile_size(model: str, arch: dict, slides: Sequence[FeatureSlide]) -> dict:
    """``arch`` with the slide model's ``tile_size`` set to the features' grid step (level-0 px per
    tile), as ``histoscope train`` sets it, unless given or the model has none."""
    from histoscope.slide import get_slide_model_spec
    from histoscope.utils.recipe import ConfigError

    arch = dict(arch)
    if "tile_size" not in arch and "tile_size" in get_slide_model_spec(model).defaults:
        sizes = sorted({s.tile_size for s in slides})
        if len(sizes) > 1:
            raise ConfigError(f"the features files mix tile sizes {sizes} (level-0 px); give arch.tile_size or "
                              "files of one tiling")
        arch["tile_size"] = sizes[0]
    return arch


def region_keys(coords: np.ndarray, tile_size: float, region_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile: its region (row, col) (N, 2) and its cell ``row * G + col`` within it (N,)."""
    cell = np.floor(coords.astype(np.float64) / tile_size).astype(np.int64)  # (N, 2) tile (col, row)
    region = np.floor_divide(cell, region_tiles)
    within = cell - region * region_tiles
    return region[:, ::-1], within[:, 1] * region_tiles + within[:, 0]


class _FeatureIndex:
    """Sample ``i``: group (slide) by ``offsets``, row within it; StepStream's index contract."""

    def __init__(self, slides: Sequence[FeatureSlide], group_sizes: Sequence[int]):
        self.slides = list(slides)
        self.group_sizes = np.asarray(group_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.group_sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return self.slides[0].dim

    def reader(self, *, max_open: int = 4) -> _FeatureReader:
        return _FeatureReader(self, keep=min(max_open, 4))

    def sample(self, group: int, row: int, features: np.ndarray, coords: np.ndarray) -> Any:
        raise NotImplementedError


class SlideFeatureIndex(_FeatureIndex):
    """One sample per slide: ``{"features": (N, D) float32, "coords": (N, 2) int64}``."""

    def __init__(self, slides: Sequence[FeatureSlide]):
        super().__init__(slides, [1] * len(slides))

    def describe(self) -> str:
        return f"{len(self.slides)} slides ({sum(s.num_tiles for s in self.slides)} tiles)"

    def sample(self, group, row, features, coords):
        return {"features": features, "coords": coords}


class RegionFeatureIndex(_FeatureIndex):
    """One sample per region with at least ``min_tiles`` tiles: a (G, G, D) float32 grid."""

    def __init__(self, slides: Sequence[FeatureSlide], *, region_tiles: int, min_tiles: int):
        import h5py

        self.region_tiles = region_tiles
        self.regions: list[np.ndarray] = []  # per slide: (R, 2) region (row, col)
        for slide in slides:
            with h5py.File(slide.path, "r") as f:  # coordinates only at indexing time
                coords = f["coords"][:].astype(np.int64)
            keys, _ = region_keys(coords, slide.tile_size, region_tiles)
            unique, counts = np.unique(keys, axis=0, return_counts=True)
            self.regions.append(unique[counts >= min_tiles])
        super().__init__(slides, [len(r) for r in self.regions])
        if len(self) == 0:
            raise ValueError(f"no region of {region_tiles}x{region_tiles} tiles holds {min_tiles} tiles or more; "
                             "lower min_region_tiles")

    def describe(self) -> str:
        return f"{len(self)} regions of {self.region_tiles}x{self.region_tiles} tiles from {len(self.slides)} slides"

    def sample(self, group, row, features, coords):
        G = self.region_tiles
        keys, cell = region_keys(coords, self.slides[group].tile_size, G)
        inside = np.flatnonzero((keys == self.regions[group][row]).all(axis=1))
        grid = np.zeros((G * G, features.shape[1]), dtype=np.float32)
        np.add.at(grid, cell[inside], features[inside])
        hits = np.bincount(cell[inside], minlength=G * G).clip(min=1).astype(np.float32)
        return (grid / hits[:, None]).reshape(G, G, -1)


class _FeatureReader:
    """Reads samples, keeping the features of the last ``keep`` slides in memory."""

    def __init__(self, index: _FeatureIndex, *, keep: int):
        self.index, self.keep = index, max(1, keep)
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _slide(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        from histoscope.io.features_h5 import read_features

        if group in self.cache:
            self.cache.move_to_end(group)
            return self.cache[group]
        features, coords, _ = read_features(self.index.slides[group].path)
        self.cache[group] = (features, coords)
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return features, coords

    def read(self, positions: np.ndarray) -> tuple[list[Any], list[str]]:
        out: list[Any] = [None] * len(positions)
        errors = []
        groups = np.searchsorted(self.index.offsets, positions, side="right") - 1
        for k, (group, position) in enumerate(zip(groups.tolist(), positions.tolist())):
            try:
                features, coords = self._slide(group)
            except (OSError, KeyError, ValueError) as error:  # one unreadable file must not stop training
                errors.append(f"{self.index.slides[group].path}: {type(error).__name__}: {error}")
                continue
            out[k] = self.index.sample(group, position - int(self.index.offsets[group]), features, coords)
        return out, errors

    def close(self) -> None:
        self.cache.clear()
