"""Applying trained slide models: per-slide predictions, tile-score heatmaps, QuPath GeoJSON, top tiles."""

from histoscope.predict.heatmap import colorize, paint_heatmap, percentile_scores, tiles_geojson, write_tile_scores
from histoscope.predict.outputs import predictions_path

__all__ = ["colorize", "paint_heatmap", "percentile_scores", "predict_slides", "predictions_path",
           "tiles_geojson", "write_tile_scores"]


def __getattr__(name: str):
    # The stage itself needs torch; the heatmap and path helpers (used by the viewer) do not.
    if name == "predict_slides":
        from histoscope.predict.run import predict_slides

        return predict_slides
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
