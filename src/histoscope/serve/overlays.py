"""A slide's outputs as the viewer draws them: tile grid, score heatmaps, top tiles, predictions, report.

Everything is read from the files the stages write (``histoscope tile``'s patches,
``histoscope predict``'s ``tile_scores.csv`` and ``predictions.json``, ``histoscope
report``'s ``reports.csv``/``reports.json``/``<slide>.txt``), found in OUT or in one of
its immediate subfolders (a prediction or report run written beside the tiles). A
prediction run is called by its folder's name (``_out`` for OUT itself).

Notation: N tiles; coords are level-0 (x, y) of a tile's top-left corner.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.predict.heatmap import colorize, percentile_scores
from histoscope.predict.outputs import predictions_path
from histoscope.serve.catalog import Catalog
from histoscope.tiling.geometry import TileGeometry
from histoscope.tiling.patches_h5 import find_patches, read_patches

__all__ = ["CMAPS", "TileScores", "tile_grid", "prediction_runs", "tile_scores", "heatmap_image", "heatmap_placement", "top_tiles",
           "slide_report", "slide_predictions"]

# Colour maps the viewer offers (matplotlib names); anything else is refused, not looked up.
CMAPS = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "coolwarm", "RdYlBu_r")
OUT_RUN = "_out"  # the name of predictions written straight into OUT
_NOT_CLASSES = {"x", "y", "percentile"}
# Longest side of a heatmap image: each tile becomes a square of whole pixels up to this.
_HEATMAP_SIDE = 2048


def tile_grid(catalog: Catalog, slide_id: str) -> dict[str, Any] | None:
    """``{size_level0, coords (N, 2), tissue_fraction (N,)?}`` from OUT's patches file, or None."""
    path = catalog.output(find_patches(catalog.out_dir, slide_id))
    if path is None:
        return None
    coords, attrs = read_patches(path)
    grid = {"size_level0": float(TileGeometry.from_attrs(attrs).size_level0), "coords": coords.tolist()}
    if "tissue_fraction" in attrs:
        grid["tissue_fraction"] = np.asarray(attrs["tissue_fraction"]).round(3).tolist()
    return grid


def prediction_runs(catalog: Catalog) -> dict[str, Path]:
    """Prediction folders by name: OUT (``_out``) and its subfolders holding ``predictions.json``."""
    runs = {}
    for folder in catalog.output_dirs():
        if catalog.output(predictions_path(folder, ".json")) is not None:
            runs[OUT_RUN if folder == catalog.out_dir else folder.name] = folder
    return runs


@dataclass(frozen=True)
class TileScores:
    coords: np.ndarray  # (N, 2) int64
    scores: dict[str, np.ndarray]  # score column name -> (N,) float64
    size_level0: float


def _tile_size(catalog: Catalog, slide_id: str, folder: Path, coords: np.ndarray) -> float:
    """Tile edge in level-0 px: from OUT's patches file, else from the run's tile squares."""
    grid = catalog.output(find_patches(catalog.out_dir, slide_id))
    if grid is not None:
        return float(TileGeometry.from_attrs(read_patches(grid)[1]).size_level0)
    shapes = catalog.output(folder / slide_id / "tiles.geojson")
    if shapes is not None:
        ring = json.loads(shapes.read_text())["features"][0]["geometry"]["coordinates"][0]
        return float(ring[1][0] - ring[0][0])
    steps = np.diff(np.unique(coords[:, 0]))
    return float(steps.min()) if len(steps) else 1.0


def tile_scores(catalog: Catalog, slide_id: str, run: str) -> TileScores | None:
    """One prediction run's per-tile scores of a slide (every numeric column but x, y,
    percentile is a score), or None when the run has none for it."""
    folder = prediction_runs(catalog).get(run)
    if folder is None:
        return None
    path = catalog.output(folder / slide_id / "tile_scores.csv")
    if path is None:
        return None
    stat = path.stat()
    return _read_tile_scores(catalog, slide_id, folder, path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_tile_scores(catalog: Catalog, slide_id: str, folder: Path, path: Path, size: int,
                      mtime_ns: int) -> TileScores | None:
    """Parsed once per version of the file (size and modification time are part of the key)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    coords = np.array([[int(float(r["x"])), int(float(r["y"]))] for r in rows], dtype=np.int64)
    scores = {}
    for column in rows[0]:
        if column in _NOT_CLASSES:
            continue
        try:
            scores[column] = np.array([float(r[column]) for r in rows])
        except (TypeError, ValueError):
            continue
    return TileScores(coords, scores, _tile_size(catalog, slide_id, folder, coords))


def _cells(scores: TileScores) -> tuple[np.ndarray, int, int, dict[str, float]]:
    """Each tile's (col, row) cell of the heatmap grid (N, 2), the grid's columns and rows, and
    its placement in level-0 px."""
    step = scores.size_level0
    origin = scores.coords.min(0)
    cells = np.round((scores.coords - origin) / step).astype(np.int64)
    cols, rows = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    placement = {"x": float(origin[0]), "y": float(origin[1]), "width": cols * step, "height": rows * step}
    return cells, cols, rows, placement


def heatmap_placement(scores: TileScores) -> dict[str, float]:
    """Where :func:`heatmap_image` goes on the slide: ``{x, y, width, height}`` in level-0 px."""
    return _cells(scores)[3]


def heatmap_image(scores: TileScores, column: str, cmap: str) -> tuple[np.ndarray, dict[str, float]]:
    """(h, w, 4) uint8 RGBA heatmap (transparent where no tile) and its placement in level-0 px.

    Each tile is one square of whole pixels coloured by its score's percentile within
    the slide (as ``histoscope predict``'s heatmap); tiles sharing a cell are averaged.
    """
    cells, cols, rows, placement = _cells(scores)
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    np.add.at(total, (cells[:, 1], cells[:, 0]), percentile_scores(scores.scores[column]))
    np.add.at(count, (cells[:, 1], cells[:, 0]), 1)
    covered = count > 0
    image = np.zeros((rows, cols, 4), np.uint8)
    image[covered, :3] = colorize(total[covered] / count[covered], cmap)
    image[covered, 3] = 255
    scale = max(1, _HEATMAP_SIDE // max(rows, cols))
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return image, placement


def top_tiles(scores: TileScores, column: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` highest-scoring tiles, best first (ties keep file order)."""
    values = scores.scores[column]
    order = np.argsort(-values, kind="stable")[:k]
    return [{"rank": rank, "x": int(scores.coords[i, 0]), "y": int(scores.coords[i, 1]),
             "size": scores.size_level0, "score": float(values[i])} for rank, i in enumerate(order, start=1)]


def slide_predictions(catalog: Catalog, slide_id: str) -> dict[str, dict[str, Any]]:
    """Each prediction run's row for the slide: ``{run: {model, task, prediction}}``."""
    found = {}
    for run, folder in prediction_runs(catalog).items():
        try:
            data = json.loads(predictions_path(folder, ".json").read_text())
        except (OSError, ValueError):
            continue
        for row in data.get("slides", []):
            if row.get("slide_id") == slide_id:
                found[run] = {"model": data.get("model"), "task": data.get("task"),
                              "prediction": {k: v for k, v in row.items() if k != "slide_id"}}
    return found


def _report_rows(path: Path) -> dict[str, str]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return {r.get("slide_id", ""): r.get("report", "") for r in csv.DictReader(fh)}
    data = json.loads(path.read_text())
    rows = data.get("reports", data.get("slides", data)) if isinstance(data, dict) else data
    if isinstance(rows, dict):
        return {str(k): v if isinstance(v, str) else v.get("report", "") for k, v in rows.items()}
    return {str(r.get("slide_id")): str(r.get("report", "")) for r in rows if isinstance(r, dict)}


def slide_report(catalog: Catalog, slide_id: str) -> dict[str, str] | None:
    """The generated report of a slide, ``{source, report}``: from ``<slide>.txt`` or a
    ``reports.json``/``reports.csv`` table, in OUT or a subfolder; None if none."""
    for folder in catalog.output_dirs():
        text = catalog.output(folder / f"{slide_id}.txt")
        if text is not None:
            report = text.read_text(errors="replace").removesuffix("\n")  # the text file's line end, not the report's
            return {"source": str(text.relative_to(catalog.out_dir)), "report": report}
        for name in ("reports.json", "reports.csv"):
            table = catalog.output(folder / name)
            if table is None:
                continue
            try:
                rows = _report_rows(table)
            except (OSError, ValueError, AttributeError):
                continue
            if slide_id in rows:
                return {"source": str(table.relative_to(catalog.out_dir)), "report": rows[slide_id]}
    return None
