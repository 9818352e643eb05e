"""CSV tables of named columns (predictions, splits), written atomically."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.io.atomic import atomic_path

__all__ = ["write_columns", "read_columns"]


def write_columns(path: str | Path, columns: dict[str, Any]) -> None:
    """A CSV of equal-length columns; floats written with full precision (``repr``)."""
    names = list(columns)
    rows = zip(*[list(columns[n]) for n in names])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])


def read_columns(path: str | Path) -> dict[str, list[str]]:
    """The columns of a CSV, as strings."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}
