"""CSV tables of named columns (predictions, splits), written atomically, and the reader
every CSV histoscope takes in goes through."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.io.atomic import atomic_path

__all__ = ["write_columns", "read_columns", "csv_reader", "table_reader"]


def write_columns(path: str | Path, columns: dict[str, Any]) -> None:
    """A CSV of equal-length columns; floats written with full precision (``repr``)."""
    names = list(columns)
    rows = zip(*[list(columns[n]) for n in names])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])


def csv_reader(path: str | Path) -> csv.DictReader:
    """Rows of a UTF-8 CSV file (with or without the byte-order mark Excel writes) as dicts.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not UTF-8 text (saved in a legacy code page, or not a CSV at all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                         "save it as UTF-8 (Excel: CSV UTF-8)") from None
    return csv.DictReader(io.StringIO(text, newline=""))


def table_reader(path: str | Path, *, required: Sequence[str], what: str) -> csv.DictReader:
    """:func:`csv_reader` with the header's names stripped of spaces, after checking the
    ``required`` columns are there (a ``ValueError`` naming the file, the ``what`` it should
    be, and the columns it has otherwise)."""
    reader = csv_reader(path)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: a {what} needs columns {', '.join(required)}; missing {', '.join(missing)} "
                         f"(has {', '.join(columns) or 'no header'})")
    return reader


def read_columns(path: str | Path) -> dict[str, list[str]]:
    """The columns of a CSV, as strings."""
    rows = list(csv_reader(path))
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}
