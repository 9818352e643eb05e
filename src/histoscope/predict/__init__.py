"""Applying trained slide models: per-slide predictions, tile-score heatmaps, QuPath GeoJSON, top tiles."""

from histoscope.predict.heatmap import colorize, paint_heatmap, percentile_scores, tiles_geojson, write_tile_scores
from histoscope.predict.run import predict_slides, predictions_path

__all__ = ["colorize", "paint_heatmap", "percentile_scores", "predict_slides", "predictions_path",
           "tiles_geojson", "write_tile_scores"]
