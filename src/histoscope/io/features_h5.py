"""``OUT/features_<encoder>/<slide>.h5``: tile embeddings, as TRIDENT and CLAM write them.

Datasets: ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 (x, y), row i
of one describing the tile of row i of the other. ``coords`` carries the attributes
of the patches file it came from (patch size, resolutions); ``features`` carries
``name``, ``encoder``, ``savetodir`` (TRIDENT's) and histoscope's provenance
(weights checksum, dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.io.atomic import atomic_path
from histoscope.io.columns import csv_reader

__all__ = ["features_folder", "features_path", "write_features", "read_features", "read_coords_attrs",
           "FeaturesWriter", "FeaturesError", "check_features", "check_finite", "collect_features"]

_CHECK_ROWS = 16384  # rows per block when scanning a file for NaN/Inf


def features_folder(out_dir: str | Path, name: str) -> Path:
    """``OUT/features_<name>``: where ``histoscope embed`` puts one encoder's features files."""
    return Path(out_dir) / f"features_{name}"


def features_path(folder: str | Path, slide_name: str) -> Path:
    """``<folder>/<slide>.h5``: a slide's features file in a features folder."""
    return Path(folder) / f"{slide_name}.h5"


class FeaturesError(ValueError):
    """A file that cannot serve as a slide's tile features: not one, damaged, empty, or not finite."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


_REEMBED = "delete it and run `histoscope embed` on the slide again"


def _check_layout(path: str | Path, f) -> tuple[int, int]:
    """(N, D) of an open features file whose datasets are where and what they should be."""
    if "features" not in f:
        raise FeaturesError(path, f"no 'features' dataset (it holds {', '.join(f) or 'nothing'}); is this a "
                                  "features file? Pass the folder histoscope embed wrote (OUT/features_<encoder>)")
    shape = f["features"].shape
    if len(shape) != 2:
        raise FeaturesError(path, f"'features' has shape {shape}, not (tiles, dim); {_REEMBED}")
    if "coords" not in f:
        raise FeaturesError(path, "no 'coords' dataset: which tile each row is cannot be known, and positions would "
                                  f"be made up; {_REEMBED}")
    if f["coords"].shape != (shape[0], 2):
        raise FeaturesError(path, f"'coords' has shape {f['coords'].shape} for {shape[0]} feature rows; {_REEMBED}")
    return int(shape[0]), int(shape[1])


def check_finite(path: str | Path, features: np.ndarray, *, start: int = 0) -> None:
    """Raise :class:`FeaturesError` if any value of ``features`` (rows ``start…``) is NaN or Inf."""
    bad = ~np.isfinite(features).all(axis=1) if features.size else np.zeros(0, bool)
    if bad.any():
        rows = np.flatnonzero(bad) + start
        raise FeaturesError(path, f"{len(rows)} tile(s) have NaN or Inf features (first: row {rows[0]}); they would "
                                  f"turn into made-up predictions. {_REEMBED[0].upper()}{_REEMBED[1:]}")


def check_features(path: str | Path, *, dim: int | None = None) -> tuple[int, int]:
    """``(N, D)`` of a features file, after checking it is usable as a slide's bag.

    Reads the file in blocks: it must be an HDF5 file with ``features`` (N, D) and
    ``coords`` (N, 2), hold at least one tile, be finite everywhere, and have ``D == dim``
    when ``dim`` is given.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    FeaturesError
        Anything else, with what is wrong and what to do.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such features file")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise FeaturesError(path, f"not a readable HDF5 file ({str(error).splitlines()[0]}); {_REEMBED}") from None
    with f:
        n, d = _check_layout(path, f)
        if n == 0:
            raise FeaturesError(path, "no tiles (no tissue was found on the slide); drop the slide from the table, "
                                      "or tile it again with a lower --min-tissue")
        if dim is not None and d != dim:
            raise FeaturesError(path, f"{d}-dim features where {dim} were expected (the dim of the other files): "
                                      "files of different encoders in one folder? Embed every slide with one encoder")
        for start in range(0, n, _CHECK_ROWS):
            check_finite(path, f["features"][start : start + _CHECK_ROWS], start=start)
    return n, d


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
    attributes). ``attrs`` merges the attributes of ``features`` and ``coords``. A file
    without ``coords``, or with one row too many in either, is a :class:`FeaturesError`;
    :func:`check_features` also checks the values.
    """
    import h5py

    with h5py.File(path, "r") as f:
        _check_layout(path, f)
        features = f["features"][:].astype(np.float32)
        coords = f["coords"][:].astype(np.int64)
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


def collect_features(specs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(slide_id, features file)`` for files, folders of ``*.h5`` and CSV tables."""
    found: list[tuple[str, Path]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.h5"))
            if not files:
                raise FileNotFoundError(f"{path}: no features files (*.h5) in this folder; pass the folder "
                                        "histoscope embed wrote (OUT/features_<encoder>)")
            found += [(f.stem, f) for f in files]
        elif path.suffix.lower() == ".csv":
            found += _from_csv(path)
        else:
            found.append((path.stem, path))  # a missing file fails its slide, not the run
    seen: dict[str, Path] = {}
    for slide_id, path in found:
        if seen.setdefault(slide_id, path) != path:
            raise ValueError(f"slide id {slide_id!r} names two features files ({seen[slide_id]} and {path}); "
                             "give each slide one file, or slide_id values in a CSV")
    return list(seen.items())


def _from_csv(path: Path) -> list[tuple[str, Path]]:
    reader = csv_reader(path)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    column = next((c for c in ("features", "path") if c in columns), None)
    if column is None:
        raise ValueError(f"{path}: a features CSV needs a 'features' (or 'path') column of .h5 files; has {columns}")
    rows = []
    for row in reader:
        file = Path((row[column] or "").strip())
        if not file.is_absolute():
            file = path.parent / file
        rows.append(((row.get("slide_id") or "").strip() or file.stem, file))
    return rows
