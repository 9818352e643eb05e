"""The geometry of one tile: ``size`` px at ``mpp`` µm/px, and what that is on the slide.

A tile of ``size`` px at ``mpp`` µm/px covers ``size * mpp / level0_mpp`` level-0 pixels
(``size_level0``), whatever the scanner's magnification: 256 px at 0.5 µm/px is 512
level-0 px on a 0.25 µm/px slide and 256 on a 0.5 µm/px one. It is read from the
coarsest pyramid level fine enough (``read_level``), as ``read_size`` px resized to
``size``. Tiling computes this once per slide, stores it in the patches file, and the
stages after it (embedding, position-aware slide models, heatmaps) read it back from
there instead of recomputing it.

In the patches and features files the fields are the attributes TRIDENT and CLAM
use: ``patch_size`` (size), ``patch_size_level0``, ``target_mpp`` (mpp), ``level0_mpp``,
``read_level``, ``read_size``; CLAM's files give the level-0 size as
``patch_size · downsample`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MPP", "DEFAULT_SIZE", "TileGeometry"]

# The resolution and tile of most pathology foundation models (20x: UNI, Prov-GigaPath, Virchow).
DEFAULT_MPP = 0.5
DEFAULT_SIZE = 256


@dataclass(frozen=True)
class TileGeometry:
    """One tile's size at the target resolution, on level 0 and where it is read from."""

    size: int  # tile edge in px at the target resolution
    mpp: float | None  # target µm/px; None: unknown (a TRIDENT/CLAM file read without its slide)
    size_level0: float  # tile edge in level-0 px: the step of a tile grid's coordinates
    level0_mpp: float | None = None  # the slide's level-0 µm/px
    read_level: int | None = None  # pyramid level tiles are read from
    read_size: int | None = None  # px read at that level before resizing to ``size``

    @classmethod
    def for_slide(cls, slide, *, size: int = DEFAULT_SIZE, mpp: float = DEFAULT_MPP) -> TileGeometry:
        """Tiles of ``size`` px at ``mpp`` µm/px on ``slide`` (a :class:`~histoscope.io.Slide`)."""
        if size <= 0:
            raise ValueError(f"tile size must be positive, got {size}")
        level0_mpp = slide.mpp
        read_level, read_size = slide.read_plan(size, mpp)
        return cls(size=int(size), mpp=float(mpp), size_level0=max(1, round(size * mpp / level0_mpp)),
                   level0_mpp=float(level0_mpp), read_level=read_level, read_size=read_size)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], *, level0_mpp: float | None = None) -> TileGeometry:
        """The geometry a patches or features file records (histoscope's, TRIDENT's or CLAM's).

        ``level0_mpp`` (the slide's) supplies the target resolution of files that do not
        store it (TRIDENT's and CLAM's); without it their ``mpp`` is None.
        """
        if "patch_size" not in attrs:
            raise ValueError("the file does not say how big its tiles are (no patch_size attribute)")
        size = int(attrs["patch_size"])
        level0_mpp = float(attrs["level0_mpp"]) if "level0_mpp" in attrs else level0_mpp
        mpp = float(attrs["target_mpp"]) if "target_mpp" in attrs else None
        if "patch_size_level0" in attrs:
            size_level0 = _number(attrs["patch_size_level0"])
        elif "downsample" in attrs:  # CLAM: patch_size px at `patch_level`, whose downsample it stores
            size_level0 = _number(size * float(np.ravel(attrs["downsample"])[0]))
        elif mpp is not None and level0_mpp is not None:
            size_level0 = _number(size * mpp / level0_mpp)
        else:
            raise ValueError("the file does not say how big its tiles are on the slide (no patch_size_level0, "
                             "downsample, nor target_mpp + level0_mpp attributes)")
        if mpp is None and level0_mpp is not None:
            mpp = level0_mpp * size_level0 / size
        read_level = int(attrs["read_level"]) if "read_level" in attrs else None
        read_size = int(attrs["read_size"]) if "read_size" in attrs else None
        return cls(size=size, mpp=mpp, size_level0=size_level0, level0_mpp=level0_mpp, read_level=read_level,
                   read_size=read_size)

    def attrs(self) -> dict[str, Any]:
        """The file attributes :meth:`from_attrs` reads back (the ones that are known)."""
        values = {"patch_size": self.size, "patch_size_level0": self.size_level0, "target_mpp": self.mpp,
                  "level0_mpp": self.level0_mpp, "read_level": self.read_level, "read_size": self.read_size}
        return {key: value for key, value in values.items() if value is not None}


def _number(value: float) -> float | int:
    """Whole level-0 sizes as int (as TRIDENT writes them), others as float."""
    value = float(value)
    return int(value) if value.is_integer() else value
