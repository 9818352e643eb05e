"""``OUT/features_<encoder>/<slide>.h5``: tile embeddings, as TRIDENT and CLAM write them.

Datasets: ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 (x, y), row i
of one describing the tile of row i of the other. ``coords`` carries the attributes
of the patches file it came from (patch size, resolutions); ``features`` carries
``name``, ``encoder``, ``savetodir`` (TRIDENT's) and histoscope's provenance
(weights checksum, dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histoscope.io.atomic import atomic_path

__all__ = ["features_folder", "features_path", "write_features", "read_features", "read_coords_attrs",
           "FeaturesWriter"]


def features_folder(out_dir: str | Path, name: str) -> Path:
    """``OUT/features_<name>``: where ``histoscope embed`` puts one encoder's features files."""
    return Path(out_dir) / f"features_{name}"


def features_path(folder: str | Path, slide_name: str) -> Path:
    """``<folder>/<slide>.h5``: a slide's features file in a features folder."""
    return Path(folder) / f"{slide_name}.h5"


def _set_attrs(dataset, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            value = "None"
        elif isinstance(value, (dict, list, tuple)) and not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value)
            except ValueError:
                value = str(value)
        dataset.attrs[key] = value


class FeaturesWriter:
    """Fills a features file row block by row block, renaming it into place at the end.

    Memory stays at one block: rows go straight to the (temporary) file, so a slide of
    100k tiles at D=1536 never sits in RAM whole.
    """

    def __init__(self, path: str | Path, *, num_tiles: int, dim: int, coords: np.ndarray,
                 coords_attrs: dict[str, Any] | None = None, features_attrs: dict[str, Any] | None = None):
        import h5py

        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._file = h5py.File(self._tmp, "w")
        chunk = (max(1, min(num_tiles, 256)), dim) if num_tiles else None
        self.features = self._file.create_dataset("features", shape=(num_tiles, dim), dtype=np.float32, chunks=chunk)
        coords_ds = self._file.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        _set_attrs(coords_ds, coords_attrs or {})
        _set_attrs(self.features, features_attrs or {})
        self.num_tiles = num_tiles
        self._written = np.zeros(num_tiles, dtype=bool)

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (n, D) at row indices ``rows`` (n,), ascending and contiguous or not."""
        rows = np.asarray(rows)
        if len(rows) and np.all(np.diff(rows) == 1):
            self.features[int(rows[0]) : int(rows[-1]) + 1] = values
        else:
            for row, value in zip(rows, values):
                self.features[int(row)] = value
        self._written[rows] = True

    @property
    def complete(self) -> bool:
        return bool(self._written.all())

    def close(self) -> Path:
        """Finish: rename into place. Refuses if any row was never written."""
        if not self.complete:
            self.abort()
            raise RuntimeError(f"{self.path}: {int((~self._written).sum())} feature rows were never written")
        self._file.close()
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; nothing appears at ``path``."""
        try:
            self._file.close()
        finally:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, *,
                   coords_attrs: dict[str, Any] | None = None, features_attrs: dict[str, Any] | None = None) -> Path:
    """Write a whole features file at once (atomically)."""
    features = np.asarray(features, dtype=np.float32)
    writer = FeaturesWriter(path, num_tiles=len(features), dim=features.shape[1] if features.ndim == 2 else 0,
                            coords=coords, coords_attrs=coords_attrs, features_attrs=features_attrs)
    writer.write(np.arange(len(features)), features)
    return writer.close()


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features (N, D) float32, coords (N, 2) int64, attrs)`` of a features file.

    Reads histoscope's, TRIDENT's and CLAM's files (CLAM stores int32 coords and no
    attributes). ``attrs`` merges the attributes of ``features`` and ``coords``.
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise KeyError(f"{path}: no 'features' dataset; is this a features file?")
        features = f["features"][:].astype(np.float32)
        coords = f["coords"][:].astype(np.int64) if "coords" in f else np.zeros((len(features), 2), np.int64)
        attrs: dict[str, Any] = {}
        for dataset in ("coords", "features"):
            if dataset in f:
                for key, value in f[dataset].attrs.items():
                    attrs[key] = value.item() if isinstance(value, np.generic) else value
    return features, coords, attrs


def read_coords_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a features (or patches) file's ``coords``, without reading any rows."""
    import h5py

    with h5py.File(path, "r") as f:
        if "coords" not in f:
            return {}
        return {key: value.item() if isinstance(value, np.generic) else value
                for key, value in f["coords"].attrs.items()}
