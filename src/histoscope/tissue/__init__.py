"""Tissue segmentation: where on a slide there is tissue, as a low-resolution mask tied
to level-0 coordinates, with outlines for QuPath and thumbnails for checking."""

from histoscope.tissue.draw import draw_contours
from histoscope.tissue.geojson import geojson_to_polygons, polygons_to_geojson
from histoscope.tissue.mask import Polygon, TissueMask
from histoscope.tissue.outputs import save_tissue_outputs, tissue_output_paths
from histoscope.tissue.segment import segment_tissue

__all__ = [
    "Polygon",
    "TissueMask",
    "draw_contours",
    "geojson_to_polygons",
    "polygons_to_geojson",
    "save_tissue_outputs",
    "segment_tissue",
    "tissue_output_paths",
]
