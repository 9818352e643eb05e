"""Streaming tiles from many slides into PyTorch with worker processes.

Work is cut into chunks of consecutive tiles of one slide; each DataLoader worker
takes every ``num_workers``-th chunk, keeps its slides open, and yields whole
chunks, so decoding runs in parallel with the model and inter-process traffic is
one array per chunk. A slide that fails yields an error item instead of killing
the loader, so one bad slide never stops a batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from histoscope.tiling.geometry import DEFAULT_MPP, DEFAULT_SIZE
from histoscope.utils.processes import die_with_parent

__all__ = ["TileSource", "TileStream", "single_threaded_worker", "start_worker_server", "tile_loader", "worker_context"]


@dataclass(frozen=True)
class TileSource:
    """Tiles to read from one slide."""

    path: str
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    size: int = DEFAULT_SIZE  # tile edge in px at the target resolution
    mpp: float | None = DEFAULT_MPP  # target µm/px (None: level 0 as stored)
    slide_mpp: float | None = None  # level-0 µm/px override
    backend: str = "auto"


class TileStream(IterableDataset):
    """Yields ``{"tiles": (n, H, W, 3) uint8 or transformed, "source": int, "index": (n,) int64}``
    per chunk, or ``{"source": int, "error": str}`` when a slide cannot be read.

    ``transform`` maps a ``(n, H, W, 3)`` uint8 numpy batch to anything collatable
    (e.g. a normalised float tensor) and runs in the worker.
    """

    def __init__(self, sources: Sequence[TileSource], *, chunk_size: int = 64,
                 transform: Callable[[np.ndarray], Any] | None = None, max_open: int = 4):
        self.sources = list(sources)
        self.chunk_size = chunk_size
        self.transform = transform
        self.max_open = max_open
        self.units = [
            (i, start, min(start + chunk_size, len(src.coords)))
            for i, src in enumerate(self.sources)
            for start in range(0, len(src.coords), chunk_size)
        ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from histoscope.io import open_slide

        info = get_worker_info()
        units = self.units if info is None else self.units[info.id :: info.num_workers]
        opened: OrderedDict[int, Any] = OrderedDict()
        failed: set[int] = set()
        try:
            for source_index, start, stop in units:
                if source_index in failed:
                    continue
                source = self.sources[source_index]
                try:
                    slide = opened.get(source_index)
                    if slide is None:
                        slide = open_slide(source.path, slide_mpp=source.slide_mpp, backend=source.backend)
                        opened[source_index] = slide
                        if len(opened) > self.max_open:
                            opened.popitem(last=False)[1].close()
                    tiles = slide.read_tiles(source.coords[start:stop], size=source.size, mpp=source.mpp)
                except Exception as error:  # reported per slide to the consumer
                    failed.add(source_index)
                    yield {"source": source_index, "error": f"{type(error).__name__}: {error}"}
                    continue
                batch = self.transform(tiles) if self.transform is not None else torch.from_numpy(tiles)
                yield {"tiles": batch, "source": source_index, "index": torch.arange(start, stop)}
        finally:
            for slide in opened.values():
                slide.close()


def tile_loader(sources: Sequence[TileSource], *, chunk_size: int = 64, num_workers: int = 2,
                transform: Callable[[np.ndarray], Any] | None = None, prefetch: int = 4) -> DataLoader:
    """A DataLoader over :class:`TileStream` chunks (``batch_size=None``: chunks are batches)."""
    stream = TileStream(sources, chunk_size=chunk_size, transform=transform)
    options: dict[str, Any] = {}
    if num_workers > 0:
        options = {"prefetch_factor": prefetch, "persistent_workers": False, "worker_init_fn": single_threaded_worker,
                   "multiprocessing_context": worker_context()}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, **options)


def worker_context():
    """Workers fork from a clean server process, never from this one: forking a process
    whose OpenCV/OpenMP thread pools have run can deadlock the child, while the server
    has only imported the decoding stack (so workers still start in milliseconds)."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["histoscope.tiling.dataset", "histoscope.encoders.preprocess", "cv2"])
    return context


def start_worker_server() -> None:
    """Start the process workers fork from, in the background: its imports (torch, the
    decoders; seconds on a busy machine) then overlap with what the caller does next, such as
    loading a model, instead of delaying the first batch. Later loaders reuse it."""
    import threading
    from multiprocessing import forkserver

    if worker_context().get_start_method() == "forkserver":
        threading.Thread(target=forkserver.ensure_running, name="forkserver-start", daemon=True).start()


def single_threaded_worker(_worker_id: int) -> None:
    """Keep each decoding worker on one core: OpenCV otherwise starts a thread pool
    per worker that fights the model's threads for the same cores. And end it with the
    run that started it: its parent is the forkserver, which would otherwise keep it
    (and itself) alive after the run is killed."""
    import cv2

    die_with_parent()

    cv2.setNumThreads(1)
