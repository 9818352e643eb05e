"""``histoscope predict``: a trained checkpoint applied to slides' features.

Output folder::

    OUT/predictions.csv, predictions.json   one row per slide that succeeded
    OUT/run_report.json                      status (and error) of every slide
    OUT/<slide>/tile_scores.csv              x, y, score, percentile per tile
    OUT/<slide>/tiles.geojson                tile squares for QuPath, coloured by score
    OUT/<slide>/heatmap.png                  scores over the thumbnail, colour bar (needs the slide file)
    OUT/<slide>/top_tiles/NN_x…_y….png       the k highest-scoring tiles (needs the slide file)

A slide that fails (no features file, unreadable slide, wrong feature dim) is
recorded as failed and the others carry on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.io.atomic import write_image, write_json
from histoscope.io.columns import write_columns
from histoscope.io.features_h5 import FeaturesError, check_finite, features_path, read_features
from histoscope.io.outdir import output_folder
from histoscope.pipeline.batch import BatchResult, run_batch
from histoscope.pipeline.executors import Executor, LocalExecutor
from histoscope.pipeline.inputs import SlideJob, collect_slides
from histoscope.predict.heatmap import paint_heatmap, percentile_scores, tiles_geojson, with_colorbar, write_tile_scores
from histoscope.predict.outputs import predictions_path
from histoscope.slide.bags import collate_bags
from histoscope.slide.trained import TrainedModel, load_trained_model
from histoscope.tiling.geometry import TileGeometry
from histoscope.utils.device import autocast, resolve_device, resolve_dtype

__all__ = ["predict_slides", "predictions_path"]


def _predict_one(job: SlideJob, *, trained: TrainedModel, features_dir: Path, out_dir: Path, with_images: bool,
                 top_k: int, thumbnail_size: int, device: torch.device, dtype: torch.dtype,
                 object_type: str) -> dict[str, Any]:
    path = features_path(features_dir, job.name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no features file for slide {job.name!r}")
    features, coords, attrs = read_features(path)
    if features.shape[1] != trained.meta["in_dim"] or len(features) == 0:
        raise FeaturesError(path, f"features of shape {features.shape}; the model expects (N > 0, "
                                  f"{trained.meta['in_dim']}): tiles embedded by the encoder it was trained on")
    check_finite(path, features)
    batch_features, batch_coords, mask = collate_bags([(features, coords)])
    with torch.no_grad(), autocast(device, dtype):
        output = trained.model(batch_features.to(device), batch_coords.to(device), mask.to(device))
    logits = output.logits.float().cpu().numpy().astype(np.float64)
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"{path}: the model's outputs are NaN or Inf for these features; try "
                                 "--precision fp32 (fp16 overflows on large features)")
    prediction = {k: (v[0].item() if isinstance(v[0], np.generic) else v[0])
                  for k, v in trained.outputs.columns(logits).items()}
    record: dict[str, Any] = {"prediction": prediction, "tiles": len(features)}
    if output.scores is None:
        record["note"] = f"{trained.meta['histoscope_model']} gives no per-tile scores; no heatmap"
        return record

    scores = output.scores[0].float().cpu().numpy().astype(np.float64)
    geometry = TileGeometry.from_attrs(attrs)
    slide_dir = out_dir / job.name
    write_tile_scores(slide_dir / "tile_scores.csv", coords, scores)
    write_json(slide_dir / "tiles.geojson",
               tiles_geojson(coords, geometry.size_level0, scores, object_type=object_type))
    if with_images:
        from histoscope.io import open_slide

        with open_slide(job.path, slide_mpp=job.slide_mpp) as slide:
            thumbnail = slide.thumbnail(thumbnail_size)
            heatmap = paint_heatmap(thumbnail, coords, geometry.size_level0, slide.dimensions,
                                    percentile_scores(scores))
            write_image(slide_dir / "heatmap.png", with_colorbar(heatmap, label="tile score percentile"))
            top = np.argsort(-scores, kind="stable")[:top_k]
            if geometry.mpp is None:  # a TRIDENT/CLAM file: its tiles' resolution follows from the slide's
                geometry = TileGeometry.from_attrs(attrs, level0_mpp=slide.mpp)
            tiles = slide.read_tiles(coords[top], size=geometry.size, mpp=geometry.mpp)
            for rank, (index, tile) in enumerate(zip(top, tiles), start=1):
                x, y = coords[index]
                write_image(slide_dir / "top_tiles" / f"{rank:02d}_x{x}_y{y}.png", tile)
        record["top_tiles"] = [[int(x), int(y)] for x, y in coords[top]]
    return record


def predict_slides(
    checkpoint: str | Path,
    *,
    features_dir: str | Path,
    out_dir: str | Path,
    slides: Sequence[str | Path] | None = None,
    slide_mpp: float | None = None,
    top_k: int = 8,
    thumbnail_size: int = 2048,
    device: str = "auto",
    precision: str = "auto",
    object_type: str = "tile",
    progress: bool = False,
    executor: Executor | None = None,
) -> BatchResult:
    """Predict every slide and write its tile scores, heatmap and top tiles.

    ``slides`` (files, folders, globs or CSVs, as for ``histoscope tile``) give the
    slide images for heatmaps and top tiles; without them every features file in
    ``features_dir`` is predicted and only the CSV/GeoJSON outputs are written.
    ``executor`` runs the slides (default: one after another in this process; a
    ``RayExecutor`` sends the model once and runs each slide as a Ray task).

    Examples
    --------
    >>> result = predict_slides("run/fold_0/checkpoint.pt", features_dir="out/features_uni",  # doctest: +SKIP
    ...                         out_dir="pred", slides=["slides/"])
    >>> result.failed                                                                       # doctest: +SKIP
    []
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    if object_type not in ("tile", "detection"):
        raise ValueError(f"object_type must be tile or detection, got {object_type!r}")
    torch_device = resolve_device(device)
    trained = load_trained_model(checkpoint, device=torch_device)
    if slides:
        jobs, with_images = collect_slides(list(slides), slide_mpp=slide_mpp), True
    else:
        if not features_dir.is_dir():
            raise FileNotFoundError(f"{features_dir}: no such features folder")
        jobs = [SlideJob(p, p.stem) for p in sorted(features_dir.glob("*.h5"))]
        with_images = False
    if not jobs:
        raise FileNotFoundError(f"{features_dir}: no features files (*.h5) to predict; pass the folder histoscope "
                                "embed wrote (OUT/features_<encoder>) to --features")
    fn = functools.partial(_predict_one, trained=trained, features_dir=features_dir, out_dir=out_dir,
                           with_images=with_images, top_k=top_k, thumbnail_size=thumbnail_size,
                           device=torch_device, dtype=resolve_dtype(precision, torch_device),
                           object_type=object_type)
    with output_folder(out_dir):
        result = run_batch(jobs, fn, out_dir=out_dir, stage="predict", executor=executor or LocalExecutor(workers=0),
                           progress=progress)
        done = [(name, r) for name, r in result.records.items() if r["status"] == "ok"]
        rows = [{"slide_id": name, **r["prediction"]} for name, r in done]
        write_json(predictions_path(out_dir, ".json"), {
            "checkpoint": str(checkpoint), "model": trained.meta["histoscope_model"], "task": trained.meta["task"],
            "slides": rows, "failed": {name: result.records[name].get("error") for name in result.failed},
        })
        if rows:
            write_columns(predictions_path(out_dir), {k: [row.get(k) for row in rows] for k in rows[0]})
        else:  # an earlier run's table would pass for this run's
            predictions_path(out_dir).unlink(missing_ok=True)
    return result
