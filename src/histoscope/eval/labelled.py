"""Labelled inputs of ``histoscope eval tiles``: image sets and labelled features files.

An image set is an ImageFolder-style tree (``ROOT/<class>/*.png``, or
``ROOT/train/<class>/…`` and ``ROOT/test/<class>/…``) or a CSV with ``path`` and
``label`` columns and optionally ``split`` (``train``/``test``); without a given split
the images are split per class with a seeded shuffle. A labelled features file is a
features h5 (``features`` (N, D)) with a ``labels`` (N,) dataset, or with a CSV naming
each tile's label by row (``tile``) or by level-0 coordinates (``x``, ``y``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "read_image_set", "stratified_split", "read_labelled_features",
           "sort_classes"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSet:
    """Images with their labels and split (``"train"`` or ``"test"``), row by row."""

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    split: tuple[str, ...]
    split_source: str  # "csv", "folders" or "seeded"

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.split) == split)


def sort_classes(labels) -> list[str]:
    """Distinct labels, in numeric order when they are all numbers (grades 2 < 10)."""
    names = sorted(set(labels))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def stratified_split(labels, *, test_fraction: float, seed: int) -> np.ndarray:
    """``"train"``/``"test"`` per row: within each class a seeded shuffle puts
    round(n · test_fraction) samples (at least one, and never all) in the test split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    labels = np.asarray(labels)
    split = np.full(len(labels), "train", dtype=object)
    rng = np.random.default_rng(seed)
    for label in sort_classes(labels.tolist()):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise ValueError(f"class {label!r} has {len(members)} image(s); a train/test split needs at least 2 "
                             "per class")
        n_test = min(len(members) - 1, max(1, round(len(members) * test_fraction)))
        split[rng.permutation(members)[:n_test]] = "test"
    return split


def _folder_images(root: Path) -> tuple[list[Path], list[str]]:
    paths, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                paths.append(path)
                labels.append(class_dir.name)
    return paths, labels


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in rows]


def read_image_set(source: str | Path, *, test_fraction: float = 0.3, seed: int = 0) -> ImageSet:
    """The labelled images under a folder or listed in a CSV, with their train/test split."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or CSV of labelled images")
    if source.is_file():
        rows = _read_csv(source)
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{source}: a labelled-image CSV needs 'path' and 'label' columns "
                             "(and optionally 'split' with train/test)")
        paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else source.parent / r["path"] for r in rows]
        labels = [r["label"] for r in rows]
        if "split" in rows[0]:
            split = [r["split"].lower() for r in rows]
            bad = sorted(set(split) - set(SPLITS))
            if bad:
                raise ValueError(f"{source}: split values must be train or test, found {bad}")
            return _checked(source, ImageSet(tuple(paths), tuple(labels), tuple(split), "csv"))
    elif (source / "train").is_dir() and (source / "test").is_dir():
        paths, labels, split = [], [], []
        for name in SPLITS:
            p, l = _folder_images(source / name)
            paths += p
            labels += l
            split += [name] * len(p)
        return _checked(source, ImageSet(tuple(paths), tuple(labels), tuple(split), "folders"))
    else:
        paths, labels = _folder_images(source)
    if not paths:
        raise ValueError(f"{source}: no images found; expected ROOT/<class>/*.png (or ROOT/train/<class>/… and "
                         "ROOT/test/<class>/…) or a CSV with path,label[,split]")
    split = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    return _checked(source, ImageSet(tuple(paths), tuple(labels), tuple(split.tolist()), "seeded"))


def _checked(source: Path, images: ImageSet) -> ImageSet:
    for name in SPLITS:
        if not len(images.indices(name)):
            raise ValueError(f"{source}: the {name} split has no images")
    train = set(np.asarray(images.labels)[images.indices("train")].tolist())
    unseen = sorted(set(np.asarray(images.labels)[images.indices("test")].tolist()) - train)
    if unseen:
        raise ValueError(f"{source}: test classes {unseen} have no training images; every class needs both splits")
    return images


def read_labelled_features(path: str | Path, labels_csv: str | Path | None = None
                           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features (N, D) float32, labels (N,) str, file attributes)`` of a features h5.

    Labels come from the file's ``labels`` dataset, or from ``labels_csv`` with a
    ``label`` column and either ``tile`` (row index) or ``x``/``y`` (level-0
    coordinates matching the file's ``coords``); tiles the CSV does not name are left out.
    """
    import h5py

    from histoscope.io.features_h5 import read_features

    features, coords, attrs = read_features(path)
    if labels_csv is None:
        with h5py.File(path, "r") as f:
            if "labels" not in f:
                raise ValueError(f"{path}: no 'labels' dataset; add one or pass a CSV of tile,label "
                                 "(or x,y,label) for this file")
            labels = f["labels"][:]
        labels = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in labels], dtype=object)
        if len(labels) != len(features):
            raise ValueError(f"{path}: {len(labels)} labels for {len(features)} feature rows")
        return features, labels, attrs
    rows = _read_csv(Path(labels_csv))
    if not rows or "label" not in rows[0] or not ("tile" in rows[0] or {"x", "y"} <= set(rows[0])):
        raise ValueError(f"{labels_csv}: needs a 'label' column and 'tile' (row index) or 'x' and 'y' columns")
    if "tile" in rows[0]:
        index = np.array([int(r["tile"]) for r in rows], dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(features)):
            raise ValueError(f"{labels_csv}: tile rows must lie in 0 … {len(features) - 1} ({path})")
    else:
        where = {(int(x), int(y)): i for i, (x, y) in enumerate(coords.tolist())}
        missing = [(r["x"], r["y"]) for r in rows if (int(r["x"]), int(r["y"])) not in where]
        if missing:
            raise ValueError(f"{labels_csv}: {len(missing)} coordinates are not tiles of {path} "
                             f"(e.g. x={missing[0][0]}, y={missing[0][1]})")
        index = np.array([where[(int(r["x"]), int(r["y"]))] for r in rows], dtype=np.int64)
    return features[index], np.array([r["label"] for r in rows], dtype=object), attrs
