"""Microns per pixel from slide metadata.

Sources, in the order they are trusted:
Aperio ``MPP = x`` in the ImageDescription, OME ``PhysicalSizeX`` (with its unit),
the TIFF ``XResolution``/``ResolutionUnit`` tags (inch or centimetre only), and for
formats read through OpenSlide its ``openslide.mpp-x`` property (which covers
Hamamatsu, MIRAX, Leica, Ventana, Philips and DICOM pixel spacing).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

__all__ = ["MPP_RANGE", "mpp_problem", "mpp_from_aperio", "mpp_from_ome", "mpp_from_resolution", "mpp_from_openslide",
           "mpp_from_png_dpm"]

# The µm/px a slide scan (or a tile cut from one) can have: 100x oil immersion is ~0.06
# and a 1.25x overview ~8. A value outside is a typo or a unit mix-up (mm or nm taken
# for µm), never a scan: it would tile a slide into nothing, or segment it at level 0.
MPP_RANGE = (0.05, 50.0)

_UM_PER_UNIT = {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0,
    "nm": 1e-3, "pm": 1e-6, "in": 25400.0, "ft": 304800.0,
}


def mpp_problem(value: object) -> str | None:
    """Why ``value`` cannot be a resolution in µm/px (to go after its name), or None if it can."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"must be a positive number of µm/px, got {value!r}"
    low, high = MPP_RANGE
    if not low <= value <= high:
        return (f"is {value:g} µm/px, outside the {low:g}–{high:g} µm/px any slide scan has "
                "(a unit mix-up? 20x is about 0.5, 40x about 0.25)")
    return None


def _valid(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def mpp_from_aperio(description: str | None) -> float | None:
    """``MPP = 0.2520`` field of an Aperio ImageDescription."""
    if not description or not description.startswith("Aperio"):
        return None
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return _valid(float(match.group(1))) if match else None


def mpp_from_ome(description: str | None) -> float | None:
    """``PhysicalSizeX`` of the first OME Pixels element, converted to µm."""
    if not description or "<OME" not in description:
        return None
    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _UM_PER_UNIT.get(unit)
            if factor is None:
                return None
            return _valid(float(element.attrib["PhysicalSizeX"]) * factor)
    return None


def mpp_from_resolution(x_resolution: float | tuple[int, int] | None, unit: int | None) -> float | None:
    """TIFF XResolution (pixels per unit) with ResolutionUnit 2 (inch) or 3 (cm).

    Unit 1 ("no absolute unit") and the 72/96 dpi that image editors write by default
    are not a scan resolution and give ``None``.
    """
    if x_resolution is None or unit not in (2, 3):
        return None
    if isinstance(x_resolution, tuple):
        num, den = x_resolution
        if den == 0:
            return None
        x_resolution = num / den
    if x_resolution <= 0:
        return None
    if unit == 2 and x_resolution in (72.0, 96.0, 300.0):
        return None
    um_per_unit = 25400.0 if unit == 2 else 10000.0
    return _valid(um_per_unit / x_resolution)


def mpp_from_png_dpm(pixels_per_metre: float | None) -> float | None:
    """PNG ``pHYs`` chunk in pixels per metre (ignored when it encodes a screen dpi)."""
    if not pixels_per_metre:
        return None
    if round(pixels_per_metre * 0.0254) in (72, 96):
        return None
    return _valid(1e6 / pixels_per_metre)


def mpp_from_openslide(properties: Mapping[str, str]) -> float | None:
    """``openslide.mpp-x`` (OpenSlide normalises every vendor's field into it)."""
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        if key in properties:
            try:
                return _valid(float(properties[key]))
            except ValueError:
                continue
    return None
