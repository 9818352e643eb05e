"""The files tissue segmentation leaves for later stages and for people to look at.

Layout under the output folder, one file per slide named by :attr:`Slide.name`::

    contours_geojson/<name>.geojson   outlines for QuPath (level-0 pixels)
    masks/<name>.png                  0/255 mask with its geometry (TissueMask.load_png)
    thumbnails/<name>.jpg             the slide with the outlines drawn
"""

from __future__ import annotations

from pathlib import Path

from histoscope.io.atomic import write_image, write_json
from histoscope.io.slide import Slide
from histoscope.tissue.draw import draw_contours
from histoscope.tissue.mask import TissueMask

__all__ = ["save_tissue_outputs", "tissue_output_paths"]


def tissue_output_paths(out_dir: str | Path, slide_name: str) -> dict[str, Path]:
    """Where :func:`save_tissue_outputs` writes, keyed ``geojson``, ``mask``, ``thumbnail``."""
    out_dir = Path(out_dir)
    return {
        "geojson": out_dir / "contours_geojson" / f"{slide_name}.geojson",
        "mask": out_dir / "masks" / f"{slide_name}.png",
        "thumbnail": out_dir / "thumbnails" / f"{slide_name}.jpg",
    }


def save_tissue_outputs(
    slide: Slide, tissue: TissueMask, out_dir: str | Path, *, name: str | None = None, thumbnail_size: int = 1024
) -> dict[str, Path]:
    """Write the GeoJSON, mask PNG and outlined thumbnail of one slide, each atomically.

    ``name`` is the slide id in the output file names (default: the file's stem), so
    slides given distinct ``slide_id``s in a CSV never overwrite each other's outputs.

    Returns
    -------
    dict of str to Path
        The paths written, as :func:`tissue_output_paths`.
    """
    paths = tissue_output_paths(out_dir, name or slide.name)
    write_json(paths["geojson"], tissue.to_geojson())
    tissue.save_png(paths["mask"])
    write_image(paths["thumbnail"], draw_contours(slide.thumbnail(thumbnail_size), tissue))
    return paths
