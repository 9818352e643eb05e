"""Backend selection: the fast TIFF path where it gives the same pixels as OpenSlide,
OpenSlide for the vendor formats, plain image decoding for ROIs."""

from __future__ import annotations

from pathlib import Path

from histoscope.io.errors import CorruptSlideError, UnsupportedSlideError
from histoscope.io.slide import Slide

__all__ = ["open_slide", "select_backend", "BACKENDS"]

BACKENDS = ("auto", "tiff", "openslide", "image")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def select_backend(path: str | Path) -> str:
    """The backend ``auto`` picks for ``path`` (does not open the pyramid)."""
    path = Path(path)
    if path.is_dir():  # DICOM folders and MIRAX companions
        return "openslide"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such slide file")
    if path.stat().st_size == 0:
        raise CorruptSlideError(path, "file is empty")
    from histoscope.io.openslide_backend import openslide_format

    if _is_tiff(path):
        import tifffile

        from histoscope.io.tiff_backend import fast_path_reason

        try:
            with tifffile.TiffFile(path) as tif:
                reason = fast_path_reason(tif)
                tiled = tif.pages.first.is_tiled
        except Exception as error:  # tifffile raises many types for damaged files
            raise CorruptSlideError(path, f"damaged TIFF ({type(error).__name__}: {error})") from error
        if reason is None:
            return "tiff"
        if openslide_format(path) is not None:
            return "openslide"
        if not tiled:
            return "image"
        raise UnsupportedSlideError(path, f"TIFF that neither the fast path ({reason}) nor OpenSlide can read")
    if openslide_format(path) is not None:
        return "openslide"
    from histoscope.io.image_backend import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    raise UnsupportedSlideError(
        path,
        "not a slide format histoscope can read (OpenSlide formats, tiled TIFF/SVS, PNG/JPEG/TIFF images)",
    )


def open_slide(path: str | Path, *, slide_mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image or a plain image.

    Parameters
    ----------
    path : str or Path
        Slide file (or DICOM folder).
    slide_mpp : float, optional
        Level-0 µm/px overriding the file's metadata (required when it has none).
    backend : {"auto", "tiff", "openslide", "image"}
        ``auto`` picks the fast TIFF reader when the file is a plain tiled pyramid,
        OpenSlide for vendor formats and PIL for ordinary images.

    Examples
    --------
    >>> slide = open_slide("sample.tiff")                      # doctest: +SKIP
    >>> tiles = slide.read_tiles([[0, 0], [512, 0]], size=256, mpp=0.5)  # doctest: +SKIP
    >>> tiles.shape                                             # doctest: +SKIP
    (2, 256, 256, 3)
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    path = Path(path)
    if backend == "auto":
        backend = select_backend(path)
    if backend == "tiff":
        from histoscope.io.tiff_backend import TiffSlide

        return TiffSlide(path, slide_mpp=slide_mpp)
    if backend == "openslide":
        from histoscope.io.openslide_backend import OpenSlideSlide

        return OpenSlideSlide(path, slide_mpp=slide_mpp)
    from histoscope.io.image_backend import ImageSlide

    return ImageSlide(path, slide_mpp=slide_mpp)
