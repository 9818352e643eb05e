"""Write-then-rename, so a killed run never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import os
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "json_safe", "write_json", "write_image", "remove_stale_partials", "PARTIAL"]

# Marker in temporary names, followed by the writer's PID: two processes writing one
# target never share a temporary file. Leftovers of killed runs are removed by
# ``remove_stale_partials`` when the next run claims the folder (``io.outdir``).
PARTIAL = ".partial"


def remove_stale_partials(folder: str | Path) -> int:
    """Delete temporary files a killed run left in ``folder`` (and below); returns how many.

    Only safe while no other run writes there: stages call it through
    :func:`histoscope.io.outdir.output_folder`, which holds the folder's lock first.
    """
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.rglob(f".*{PARTIAL}*"):
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched. The
    temporary name keeps the suffix, so libraries that pick a format from it work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{PARTIAL}-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_safe(value: Any) -> Any:
    """NaN and infinities → null, numpy scalars → Python numbers, tuples → lists: strict JSON."""
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_image(path: str | Path, image, *, quality: int = 90) -> None:
    """Save an (H, W, 3) uint8 array as PNG/JPEG (by suffix), atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, quality=quality)
