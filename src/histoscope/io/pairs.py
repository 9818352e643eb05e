"""Image–text pair tables: one CSV row per pair, an image or a features file plus its caption.

Columns: ``caption``; ``image`` (a PNG/JPEG/TIFF file) or ``features`` (a histoscope
features ``.h5``, whose ``features`` rows are the pair's tokens, or a ``.npy`` of shape
(D,) or (N, D)) -- a table may mix the two columns, each row filling one; optional
``split`` (train / val / test) and ``label`` (a class, for zero-shot evaluation).
Relative paths are relative to the CSV's folder.

A row that cannot be used (no file, an empty caption, both or neither input) is
reported in one line naming the table, the row and the fix, and left out; the others
go on.

Notation: N tokens of a features file (1 for a single vector), D feature dim.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FEATURES_SUFFIXES", "IMAGE_SUFFIXES", "Pair", "SPLITS", "read_pairs", "read_pair_features",
           "read_pair_image"]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
FEATURES_SUFFIXES = (".h5", ".npy")


@dataclass(frozen=True)
class Pair:
    """One usable row of a pair table (``row``: its 1-based data row in the CSV)."""

    row: int
    path: Path
    kind: str  # "image" or "features"
    caption: str
    split: str | None = None
    label: str | None = None


def _problem(table: Path, row: int, message: str) -> str:
    return f"{table} row {row}: {message}"


def _pair(table: Path, row: int, record: dict[str, str]) -> Pair:
    """The row as a :class:`Pair`; ValueError with the reason otherwise."""
    image = (record.get("image") or "").strip()
    features = (record.get("features") or "").strip()
    if bool(image) == bool(features):
        raise ValueError("fill exactly one of the image and features columns")
    caption = (record.get("caption") or "").strip()
    if not caption:
        raise ValueError("empty caption")
    kind, value = ("image", image) if image else ("features", features)
    path = Path(value).expanduser()
    path = path if path.is_absolute() else table.parent / path
    suffixes = IMAGE_SUFFIXES if kind == "image" else FEATURES_SUFFIXES
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: a {kind} file must end in {', '.join(suffixes)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such {kind} file (paths are relative to the table's folder)")
    split = (record.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)} (or empty)")
    label = (record.get("label") or "").strip() or None
    return Pair(row=row, path=path, kind=kind, caption=caption, split=split, label=label)


def read_pairs(path: str | Path) -> tuple[list[Pair], list[str]]:
    """``(pairs, problems)``: the usable rows, and one line per row left out."""
    table = Path(path)
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such pair table")
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if "caption" not in columns or not columns & {"image", "features"}:
            raise ValueError(f"{table}: a pair table needs a caption column and an image or features column "
                             f"(found {', '.join(sorted(columns)) or 'no header'})")
        records = list(reader)
    pairs, problems = [], []
    for row, record in enumerate(records, start=1):
        try:
            pairs.append(_pair(table, row, record))
        except ValueError as error:
            problems.append(_problem(table, row, str(error)))
    return pairs, problems


def read_pair_features(path: str | Path) -> np.ndarray:
    """(N, D) float32 from a features ``.h5`` (its ``features`` dataset) or a ``.npy``."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        import h5py

        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                raise ValueError(f"{path}: no 'features' dataset (a histoscope features file has one)")
            array = fh["features"][:]
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not len(array):
        raise ValueError(f"{path}: features must be (D,) or (N, D) with N >= 1, got shape {array.shape}")
    return array


def read_pair_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
