"""Applying trained slide models: per-slide predictions, tile-score heatmaps, QuPath GeoJSON, top tiles."""

from histoscope.predict.heatmap import colorize, paint_heatmap, percentile_scores, tiles_geojson, write_tile_scores
from histoscope.predict.run import predict_slides, tile_size_level0

__all__ = ["colorize", "paint_heatmap", "percentile_scores", "predict_slides", "tile_size_level0",
           "tiles_geojson", "write_tile_scores"]
