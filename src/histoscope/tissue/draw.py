"""Tissue outlines drawn on a thumbnail, for checking segmentation by eye."""

from __future__ import annotations

import numpy as np

from histoscope.tissue.mask import TissueMask

__all__ = ["draw_contours"]

_SUBPIXEL_BITS = 4  # cv2 draws at 1/16-px precision, so small thumbnails stay faithful


def draw_contours(
    image: np.ndarray,
    tissue: TissueMask,
    *,
    color: tuple[int, int, int] = (0, 200, 0),
    thickness: int = 2,
) -> np.ndarray:
    """Tissue outlines and holes drawn onto a picture of the whole slide.

    Parameters
    ----------
    image : (H, W, 3) uint8
        The whole slide at any size (e.g. :meth:`Slide.thumbnail`); x and y are
        scaled separately, so a thumbnail rounded to whole pixels still lines up.
    tissue : TissueMask
    color : (int, int, int)
        RGB line colour.
    thickness : int
        Line width in image pixels.

    Returns
    -------
    (H, W, 3) uint8
        A copy of ``image`` with the outlines drawn.
    """
    import cv2

    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    height, width = out.shape[:2]
    scale = np.array([width / tissue.level0_size[0], height / tissue.level0_size[1]])
    factor = 1 << _SUBPIXEL_BITS
    rings = [
        # Continuous coordinates to cv2's, whose pixel centres are the integers.
        np.round((ring * scale - 0.5) * factor).astype(np.int32)[:, None]
        for polygon in tissue.contours()
        for ring in polygon.rings
    ]
    if rings:
        cv2.polylines(out, rings, True, tuple(int(c) for c in color), thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
    return out
