"""The stages that run over many slides: tiling and embedding, as resumable batch jobs
with a pluggable executor (``embed_slides``, which needs torch, is imported on first use)."""

from histoscope.pipeline.batch import REPORT_NAME, BatchResult, run_batch
from histoscope.pipeline.executors import Executor, LocalExecutor, WorkerCrashed, get_executor, open_executor
from histoscope.pipeline.inputs import SlideJob, collect_slides
from histoscope.pipeline.tile_job import TileParams, tile_slide, tiling_done

__all__ = [
    "REPORT_NAME", "BatchResult", "Executor", "LocalExecutor", "SlideJob", "TileParams", "WorkerCrashed",
    "collect_slides", "get_executor", "open_executor", "run_batch", "tile_slide", "tiling_done", "tile_slides",
    "EmbedParams", "embed_slides", "embed_slide",
]


def __getattr__(name: str):
    if name in ("EmbedParams", "embed_slides", "embed_slide"):
        from histoscope.pipeline import embed

        return getattr(embed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tile_slides(slides, *, out_dir, params: TileParams | None = None, workers: int = 1, slide_mpp=None,
                progress: bool = True, executor: Executor | None = None) -> BatchResult:
    """Tile many slides (paths, folders, globs or CSVs) into ``out_dir``; resumable.

    Examples
    --------
    >>> result = tile_slides(["slides/"], out_dir="out", workers=2)   # doctest: +SKIP
    >>> result.failed                                                  # doctest: +SKIP
    []
    """
    import functools

    params = params or TileParams()
    jobs = collect_slides(list(slides), slide_mpp=slide_mpp)
    return run_batch(
        jobs,
        functools.partial(tile_slide, out_dir=str(out_dir), params=params),
        out_dir=out_dir,
        stage="tile",
        is_done=functools.partial(tiling_done, out_dir=out_dir, params=params),
        executor=executor or LocalExecutor(workers=workers),
        progress=progress,
    )
