"""Tissue segmentation on a low-resolution read of the slide.

Stained tissue is coloured and glass is grey, so the HSV saturation of a ~8 µm/px
image separates them with one Otsu threshold; marker ink and black debris are
taken out by colour before the mask is tidied by closing, hole filling and a
minimum piece size. Every size below is physical (µm or
µm²) and turned into pixels at the resolution actually read, so the same section
scanned at 0.25 or 0.5 µm/px gives the same mask.
"""

from __future__ import annotations

import numpy as np

from histoscope.io.slide import Slide
from histoscope.tissue.mask import TissueMask

__all__ = ["segment_tissue"]

# Glass reads at saturation ~0-12/255 on scanners we know. The threshold never goes
# below this, so on a slide of bare glass (where Otsu splits noise) nothing is tissue.
MIN_TISSUE_SATURATION = 15

# Pen ink, in OpenCV HSV (hue 0-180). Hematoxylin is violet (hue ~130-160 at low
# resolution) and the blue counterstain of IHC reaches hue ~120 but stays below
# saturation ~70, so blue needs high saturation; nothing in H&E or DAB is green.
_BLUE_HUE = (100, 130)
_BLUE_MIN_SATURATION = 100
_GREEN_HUE = (35, 90)
_GREEN_MIN_SATURATION = 60
# A stroke's edge blends into glass with less saturation; pen-coloured pixels this
# close to a stroke belong to it.
_PEN_MARGIN_UM = 24.0
# Value (brightness) below which a pixel is a black artefact (marker, dirt, folds of
# charred tissue): darker than the densest stained tissue at 8 µm/px (~V 65).
_BLACK_MAX_VALUE = 40


def segment_tissue(
    slide: Slide,
    *,
    seg_mpp: float = 8.0,
    blur_um: float = 32.0,
    close_um: float = 32.0,
    min_tissue_area_um2: float = 10_000.0,
    min_hole_area_um2: float = 10_000.0,
    saturation_threshold: float | None = None,
    remove_pen: bool = True,
    remove_black: bool = True,
) -> TissueMask:
    """Find the tissue on a slide from one low-resolution read.

    Parameters
    ----------
    slide : Slide
        Any histoscope slide with a known resolution (``slide.mpp``).
    seg_mpp : float
        Resolution to segment at. The slide is read from the coarsest pyramid level
        at least this fine, in blocks of at most ``READ_CHUNK`` squared pixels each
        shrunk as it is read, so memory stays bounded even where that level is level
        0 of a large slide. Slides coarser than this are used as stored.
    blur_um : float
        Median-filter width: smooths nuclei and white spaces inside tissue (a 5-px
        filter at 8 µm/px) before thresholding.
    close_um : float
        Diameter of the disk for morphological closing: bridges cracks and pale
        gaps narrower than this, far below the smallest lumen kept (~110 µm).
    min_tissue_area_um2 : float
        Tissue pieces smaller than this are dropped. 10,000 µm² is a 100-µm square,
        a few hundred cells and 60% of a 256-px tile at 0.5 µm/px; coloured objects
        smaller than that at 8 µm/px are as often dust, debris or floaters as tissue.
    min_hole_area_um2 : float
        Holes smaller than this are filled (a 110-µm disk): small vessels, fat cells
        and tears stay in the tissue, lumens and large tears stay holes.
    saturation_threshold : float or None
        Fixed threshold on saturation (0-255); ``None`` chooses it by Otsu, but never
        below 15, so a slide of bare glass gives an empty mask, not noise.
    remove_pen, remove_black : bool
        Exclude blue/green marker ink and black artefacts from the tissue.

    Returns
    -------
    TissueMask
        ``mask`` is (h, w) bool at ``mpp`` µm/px, where ``mpp >= seg_mpp`` only for
        slides scanned coarser than ``seg_mpp``.
    """
    import cv2

    downsample = max(1.0, seg_mpp / slide.mpp)
    mpp = slide.mpp * downsample
    rgb = slide.read_at_downsample(downsample)  # (h, w, 3) uint8
    rgb = cv2.medianBlur(rgb, _odd_pixels(blur_um, mpp))
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # (h, w, 3): hue 0-180, sat, value
    saturation = hsv[..., 1]

    artefact = np.zeros(saturation.shape, bool)
    if remove_pen:
        artefact |= _pen_mask(hsv, mpp)
    if remove_black:
        artefact |= hsv[..., 2] < _BLACK_MAX_VALUE

    threshold = saturation_threshold
    if threshold is None:
        threshold = max(_otsu(saturation[~artefact]), MIN_TISSUE_SATURATION)
    tissue = (saturation > threshold) & ~artefact

    tissue = _close(tissue, _odd_pixels(close_um, mpp))
    tissue = _fill_small_holes(tissue, min_hole_area_um2 / mpp**2)
    tissue = _remove_small_pieces(tissue, min_tissue_area_um2 / mpp**2)
    return TissueMask(mask=tissue, mpp=mpp, downsample=downsample, level0_size=slide.dimensions)


def _odd_pixels(um: float, mpp: float) -> int:
    """An odd kernel size (>= 1) spanning about ``um`` at ``mpp``; odd, so centred."""
    return max(1, 2 * round(um / mpp / 2) + 1)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8 saturation ``values`` (pixels above it are stained)."""
    from skimage.filters import threshold_otsu

    counts = np.bincount(values.ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:  # one grey level (or none): nothing to split
        return 0.0
    # Otsu on sqrt(saturation): a slide rich in tissue has three modes (glass, pale
    # and dense stain) and plain Otsu splits the two stains, dropping pale tissue.
    # The square root spreads the low end, so the split falls between glass and stain.
    return float(threshold_otsu(hist=(counts, np.sqrt(np.arange(256))))) ** 2


def _pen_mask(hsv: np.ndarray, mpp: float) -> np.ndarray:
    """(h, w) bool: blue or green marker ink, including the faint edge of strokes."""
    import cv2

    hue, saturation = hsv[..., 0], hsv[..., 1]
    blue = (hue >= _BLUE_HUE[0]) & (hue <= _BLUE_HUE[1])
    green = (hue >= _GREEN_HUE[0]) & (hue <= _GREEN_HUE[1])
    core = (blue & (saturation >= _BLUE_MIN_SATURATION)) | (green & (saturation >= _GREEN_MIN_SATURATION))
    if not core.any():
        return core
    size = _odd_pixels(2 * _PEN_MARGIN_UM, mpp)
    near = cv2.dilate(core.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))) > 0
    return core | (near & (blue | green))


def _close(mask: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if size <= 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    # Pad so closing near the image edge does not glue tissue to the border.
    pad = size
    padded = np.pad(mask.astype(np.uint8), pad)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
    return closed[pad:-pad, pad:-pad] > 0


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """Fill background regions enclosed by tissue with fewer than ``max_pixels``."""
    import cv2

    if max_pixels <= 0:
        return mask
    # Glass is 4-connected where tissue is 8-connected, so a hole is what a ring of
    # tissue encloses; the padding joins all glass reaching the edge into one region.
    background = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < max_pixels
    small[0] = False  # label 0 is tissue
    small[labels[0, 0]] = False  # the glass around the tissue
    return mask | small[labels[1:-1, 1:-1]]


def _remove_small_pieces(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    import cv2

    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[labels]
