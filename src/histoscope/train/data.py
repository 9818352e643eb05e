"""Slide tables and bags of tile features for training.

Notation: N tiles, D feature dim.

A bag's features file is read once and kept in an LRU cache bounded in bytes, so
epochs after the first read from memory (batches are padded by
:func:`histoscope.slide.bags.collate_bags`). All randomness (epoch order, balanced sampling, tile
subsampling) comes from generators seeded by ``(seed, fold, epoch, …)``, so a run
resumed at any epoch sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.io.features_h5 import read_coords_attrs, read_features
from histoscope.tiling.geometry import TileGeometry

__all__ = ["Sample", "read_table", "FeatureCache", "BagDataset", "epoch_order", "features_dim", "features_geometry"]


@dataclass(frozen=True)
class Sample:
    """One row of the slide table."""

    slide_id: str
    patient_id: str
    label: str | None = None  # classification label or regression target, as written
    time: float | None = None
    event: int | None = None
    fold: str | None = None
    split: str | None = None


def _event(text: str, where: str) -> int:
    value = text.strip().lower()
    if value in ("1", "1.0", "true", "yes", "dead", "event"):
        return 1
    if value in ("0", "0.0", "false", "no", "alive", "censored"):
        return 0
    raise ValueError(f"{where}: event {text!r} is not 0/1")


def read_table(path: str | Path, *, task: str, label_column: str = "label") -> list[Sample]:
    """Rows of a slide CSV, checked: required columns present, no duplicate slides, values parse.

    Columns: ``slide_id``; ``label_column`` (classification, regression) or ``time`` and
    ``event`` (survival); optional ``patient_id`` (defaults to the slide), ``fold``,
    ``split`` (train/val/test).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slide table")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        needed = ["slide_id"] + (["time", "event"] if task == "survival" else [label_column])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{path}: a {task} table needs columns {needed}; missing {missing} (has {columns})")
        samples, seen = [], set()
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}:{row_number}"
            slide_id = (row["slide_id"] or "").strip()
            if not slide_id:
                raise ValueError(f"{where}: empty slide_id")
            if slide_id in seen:
                raise ValueError(f"{where}: slide {slide_id!r} appears twice")
            seen.add(slide_id)
            values = {key: (row.get(key) or "").strip() or None for key in ("patient_id", "fold", "split")}
            if values["split"] is not None:
                values["split"] = values["split"].lower()
                if values["split"] not in ("train", "val", "test"):
                    raise ValueError(f"{where}: split {values['split']!r} must be train, val or test")
            if task == "survival":
                try:
                    time = float(row["time"])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: time {row['time']!r} is not a number") from None
                if not time >= 0:
                    raise ValueError(f"{where}: time must be >= 0, got {time}")
                sample = Sample(slide_id, values["patient_id"] or slide_id, time=time,
                                event=_event(row["event"] or "", where), fold=values["fold"], split=values["split"])
            else:
                label = (row[label_column] or "").strip()
                if not label:
                    raise ValueError(f"{where}: empty {label_column}")
                if task == "regression":
                    try:
                        float(label)
                    except ValueError:
                        raise ValueError(f"{where}: {label_column} {label!r} is not a number") from None
                sample = Sample(slide_id, values["patient_id"] or slide_id, label=label, fold=values["fold"],
                                split=values["split"])
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no slides")
    return samples


def features_dim(path: str | Path) -> int:
    """D of a features file, without reading its rows."""
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].shape[1])


def features_geometry(path: str | Path) -> TileGeometry | None:
    """The tile geometry a features file records, if it records enough of one."""
    try:
        return TileGeometry.from_attrs(read_coords_attrs(path))
    except ValueError:
        return None


class FeatureCache:
    """Features files held in memory, least recently used dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Path, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.bytes = 0
        self.reads = 0

    def get(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, D) float32, coords (N, 2) int64)``."""
        path = Path(path)
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        features, coords, _ = read_features(path)
        self.reads += 1
        size = features.nbytes + coords.nbytes
        if size <= self.max_bytes:
            self._items[path] = (features, coords)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (f, c) = self._items.popitem(last=False)
                self.bytes -= f.nbytes + c.nbytes
        return features, coords


class BagDataset:
    """Bags of tile features by index, with optional random tile subsampling for training."""

    def __init__(self, paths: list[Path], cache: FeatureCache, *, max_tiles: int | None = None):
        self.paths = list(paths)
        self.cache = cache
        self.max_tiles = max_tiles

    def __len__(self) -> int:
        return len(self.paths)

    def bag(self, index: int, *, subsample_seed: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(features (N, D), coords (N, 2))``; at most ``max_tiles`` rows when a seed is given."""
        features, coords = self.cache.get(self.paths[index])
        if subsample_seed is not None and self.max_tiles is not None and len(features) > self.max_tiles:
            rng = np.random.default_rng([*subsample_seed, index])
            keep = np.sort(rng.choice(len(features), size=self.max_tiles, replace=False))
            features, coords = features[keep], coords[keep]
        return features, coords


def epoch_order(n: int, *, seed: tuple[int, ...], weights: np.ndarray | None = None) -> np.ndarray:
    """The epoch's sample order: a permutation, or ``n`` draws ∝ ``weights`` (balanced sampling)."""
    rng = np.random.default_rng(list(seed))
    if weights is None:
        return rng.permutation(n)
    weights = np.asarray(weights, dtype=np.float64)
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())
