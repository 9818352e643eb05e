"""The per-slide tiling job: open → segment tissue → tile grid → patches h5."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histoscope.pipeline.inputs import SlideJob
from histoscope.tiling import DEFAULT_MIN_TISSUE, DEFAULT_MPP, DEFAULT_SIZE

__all__ = ["TileParams", "tile_slide", "tiling_done"]


@dataclass(frozen=True)
class TileParams:
    """Everything that determines a slide's tiles (stored in the patches file)."""

    size: int = DEFAULT_SIZE
    mpp: float = DEFAULT_MPP
    overlap: int = 0
    min_tissue: float = DEFAULT_MIN_TISSUE
    seg_mpp: float = 8.0
    remove_pen: bool = True
    backend: str = "auto"


def _stored_params(params: TileParams) -> dict[str, Any]:
    return {f"histoscope_{k}": v for k, v in asdict(params).items()}


def tiling_done(job: SlideJob, out_dir: str | Path, params: TileParams) -> bool:
    """True if the patches file exists and was made with the same parameters."""
    import h5py

    from histoscope.tiling import patches_path

    path = patches_path(out_dir, job.name)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = f["coords"].attrs
            return all(
                k in attrs and (attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]) == v
                for k, v in _stored_params(params).items()
            )
    except (OSError, KeyError):
        return False


def tile_slide(job: SlideJob, *, out_dir: str | Path, params: TileParams) -> dict[str, Any]:
    """Tile one slide into ``out_dir``; returns its run-report fields."""
    from histoscope.io import open_slide
    from histoscope.tiling import patches_path, tile_grid, write_patches
    from histoscope.tissue import save_tissue_outputs, segment_tissue

    out_dir = Path(out_dir)
    notes: list[str] = []
    with open_slide(job.path, slide_mpp=job.slide_mpp, backend=params.backend) as slide:
        tissue = segment_tissue(slide, seg_mpp=params.seg_mpp, remove_pen=params.remove_pen)
        save_tissue_outputs(slide, tissue, out_dir, name=job.name)
        grid = tile_grid(slide, tissue, size=params.size, mpp=params.mpp, overlap=params.overlap,
                         min_tissue=params.min_tissue)
        if len(grid) == 0:
            message = f"{job.path}: no tissue found; wrote an empty coordinate list"
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        write_patches(patches_path(out_dir, job.name), grid, slide_name=job.name, slide_path=str(job.path),
                      extra=_stored_params(params))
        return {
            "tiles": len(grid),
            "level0_mpp": grid.geometry.level0_mpp,
            "patch_size_level0": grid.geometry.size_level0,
            "backend": slide.backend,
            "warnings": notes,
        }
