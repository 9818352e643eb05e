"""``histoscope embed``: tile embeddings for every slide, with I/O hidden behind compute.

Tiles are read and preprocessed by DataLoader worker processes (one chunk of one
slide at a time) while the model runs in the main process on its device in the
best dtype; embeddings go straight into each slide's features file, which is renamed
into place when its last row arrives. Slides already embedded with the same encoder
and weights are skipped, so a killed run resumes.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.encoders.preprocess import preprocess_tiles
from histoscope.io.atomic import remove_stale_partials
from histoscope.io.features_h5 import FeaturesWriter, features_path
from histoscope.pipeline.batch import BatchResult, RunReport
from histoscope.pipeline.inputs import SlideJob, collect_slides
from histoscope.tiling.dataset import TileSource, tile_loader
from histoscope.tiling.patches_h5 import patches_path, read_patches
from histoscope.utils.device import resolve_device, resolve_dtype

__all__ = ["EmbedParams", "embed_slide", "embed_slides", "features_done", "prepare_encoder"]


@dataclass(frozen=True)
class EmbedParams:
    """How tiles become embeddings."""

    encoder: str = "uni"
    weights: str | None = None
    batch_size: int = 64
    workers: int = 2  # tile-decoding processes
    devices: tuple[str, ...] = ("auto",)
    dtype: str = "auto"
    compile: bool = False
    channels_last: bool = True
    arch: dict[str, Any] = field(default_factory=dict)  # architecture overrides (tiny variants)
    output_name: str | None = None  # folder suffix; default: the encoder name

    @property
    def folder_name(self) -> str:
        return self.output_name or self.encoder.replace(":", "_").replace("/", "_")


def features_done(path: Path, *, encoder: str, weights_sha256: str, num_tiles: int) -> bool:
    """True if ``path`` holds the embeddings of the same tiles by the same weights."""
    import h5py

    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = f["features"].attrs
            return (f["features"].shape[0] == num_tiles and attrs.get("encoder") == encoder
                    and attrs.get("weights_sha256") == weights_sha256)
    except (OSError, KeyError):
        return False


def prepare_encoder(params: EmbedParams, device: torch.device):
    """Load the encoder on ``device`` in the run's dtype (channels-last, compiled if asked)."""
    from histoscope.encoders import load_tile_encoder

    dtype = resolve_dtype(params.dtype, device)
    encoder = load_tile_encoder(params.encoder, weights=params.weights, device=device, dtype=dtype, **params.arch)
    encoder.eval()
    if params.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    model = torch.compile(encoder) if params.compile else encoder
    return encoder, model, dtype


class _DeviceWorkers:
    """One thread per device, each with its own model replica, fed from one queue.

    With a single device the model runs inline (no thread): the usual CPU/1-GPU case.
    """

    def __init__(self, params: EmbedParams):
        self.devices = [resolve_device(d) for d in params.devices]
        self.replicas = [prepare_encoder(params, device) for device in self.devices]
        self.encoder, _, self.dtype = self.replicas[0]
        self.inline = len(self.devices) == 1
        self.results: queue.Queue = queue.Queue()
        if not self.inline:
            self.inbox: queue.Queue = queue.Queue(maxsize=2 * len(self.devices))
            self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(self.devices))]
            for thread in self.threads:
                thread.start()

    def _run(self, index: int, batch: torch.Tensor) -> np.ndarray:
        _, model, dtype = self.replicas[index]
        device = self.devices[index]
        batch = batch.to(device, non_blocking=True).to(dtype)
        if batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(batch).float().cpu().numpy()

    def _loop(self, index: int) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            tag, batch = item
            try:
                self.results.put((tag, self._run(index, batch), None))
            except Exception as error:  # surfaced to the consumer with its batch
                self.results.put((tag, None, error))

    def submit(self, tag: Any, batch: torch.Tensor) -> None:
        if self.inline:
            self.results.put((tag, self._run(0, batch), None))
        else:
            self.inbox.put((tag, batch))

    def close(self) -> None:
        if not self.inline:
            for _ in self.threads:
                self.inbox.put(None)
            for thread in self.threads:
                thread.join()


def embed_slides(slides, *, out_dir: str | Path, params: EmbedParams | None = None, slide_mpp: float | None = None,
                 progress: bool = True) -> BatchResult:
    """Embed the tiles of every slide (as listed by ``histoscope tile``) into
    ``out_dir/features_<encoder>/<slide>.h5``.

    Examples
    --------
    >>> from histoscope.encoders.extract import EmbedParams, embed_slides      # doctest: +SKIP
    >>> embed_slides(["slides/"], out_dir="out", params=EmbedParams(encoder="uni", weights="uni.bin"))  # doctest: +SKIP
    """
    params = params or EmbedParams()
    out_dir = Path(out_dir)
    jobs = collect_slides(list(slides), slide_mpp=slide_mpp)
    workers = _DeviceWorkers(params)  # first: a bad checkpoint fails before anything is written
    feature_dir = out_dir / f"features_{params.folder_name}"
    feature_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(feature_dir)
    report = RunReport(feature_dir, "embed")
    encoder = workers.encoder
    checksum = encoder.weights_sha256

    sources: list[TileSource] = []
    pending: list[tuple[SlideJob, dict[str, Any], np.ndarray]] = []
    for job in jobs:
        try:
            coords, attrs = read_patches(_find_patches(out_dir, job.name))
        except (OSError, KeyError) as error:
            report.update(job, {"status": "failed", "error": f"no tile coordinates for {job.path} "
                                f"({type(error).__name__}: {error}); run `histoscope tile` on it first"})
            continue
        path = features_path(out_dir, params.folder_name, job.name)
        if features_done(path, encoder=params.encoder, weights_sha256=checksum, num_tiles=len(coords)):
            report.skipped(job)
            continue
        pending.append((job, attrs, coords))

    writers: dict[int, FeaturesWriter] = {}
    started: dict[int, float] = {}
    failed: set[int] = set()
    for index, (job, attrs, coords) in enumerate(pending):
        sources.append(TileSource(str(job.path), coords, int(attrs["patch_size"]), _target_mpp(attrs, job), job.mpp))
        coords_attrs = {k: v for k, v in attrs.items() if k != "tissue_fraction"}
        writer = FeaturesWriter(
            feature_dir / f"{job.name}.h5", num_tiles=len(coords), dim=encoder.embed_dim,
            coords=coords, coords_attrs=coords_attrs,
            features_attrs={"name": job.name, "encoder": params.encoder, "savetodir": str(feature_dir),
                            "weights_sha256": checksum, "weights_path": str(encoder.weights_path or ""),
                            "dtype": str(workers.dtype).replace("torch.", ""), "embed_dim": encoder.embed_dim},
        )
        writers[index] = writer
        started[index] = time.perf_counter()

    def finish(index: int, record: dict[str, Any]) -> None:
        job = pending[index][0]
        record["seconds"] = round(time.perf_counter() - started[index], 3)
        report.update(job, record)

    # Empty slides are done at once; the rest stream.
    for index, writer in list(writers.items()):
        if writer.complete:
            writer.close()
            del writers[index]
            finish(index, {"status": "ok", "tiles": 0})

    total_tiles = sum(len(pending[i][2]) for i in writers)
    bar = _TileProgress(total_tiles) if progress and total_tiles else None
    # Preprocessing runs in the decoding workers; a partial of a module-level function
    # pickles cheaply (the encoder itself never leaves this process).
    transform = functools.partial(preprocess_tiles, preprocess=encoder.spec.preprocess)
    # Slides already finished above have no tiles, so they yield no chunks.
    loader = tile_loader(sources, chunk_size=params.batch_size, num_workers=params.workers, transform=transform)
    in_flight = 0
    try:
        for item in loader:
            index = item["source"]
            if index in failed:
                continue
            if "error" in item:
                failed.add(index)
                writers.pop(index).abort()
                finish(index, {"status": "failed", "error": item["error"]})
                continue
            workers.submit((index, item["index"].numpy()), item["tiles"])
            in_flight += 1
            in_flight -= _drain(workers, writers, failed, finish, bar, block=False)
        while in_flight:
            in_flight -= _drain(workers, writers, failed, finish, bar, block=True)
    finally:
        workers.close()
        for writer in writers.values():
            writer.abort()
        if bar is not None:
            bar.close()
    return BatchResult({job.name: report.records[job.name] for job in jobs if job.name in report.records})


def _find_patches(out_dir: Path, name: str) -> Path:
    """``patches/<slide>_patches.h5`` (histoscope, TRIDENT), else CLAM's ``patches/<slide>.h5``."""
    path = patches_path(out_dir, name)
    clam = out_dir / "patches" / f"{name}.h5"
    return clam if not path.exists() and clam.exists() else path


def _target_mpp(attrs: dict[str, Any], job: SlideJob) -> float:
    """Tile resolution of a patches file: ours stores it; TRIDENT/CLAM files give it
    through the level-0 patch size."""
    if "target_mpp" in attrs:
        return float(attrs["target_mpp"])
    from histoscope.io import open_slide

    patch_size = float(attrs["patch_size"])
    if "patch_size_level0" in attrs:
        size0 = float(attrs["patch_size_level0"])
    else:  # CLAM: patch_size px at `patch_level`, whose downsample is stored
        size0 = patch_size * float(np.ravel(attrs.get("downsample", [1.0]))[0])
    with open_slide(job.path, mpp=job.mpp) as slide:
        return slide.mpp * size0 / patch_size


def _drain(workers: _DeviceWorkers, writers, failed, finish, bar, *, block: bool) -> int:
    """Write finished batches to their slides' files; returns how many were taken."""
    taken = 0
    while True:
        try:
            (index, rows), values, error = workers.results.get(block=block and taken == 0)
        except queue.Empty:
            return taken
        taken += 1
        if index in failed:
            continue
        if error is not None:
            failed.add(index)
            writers.pop(index).abort()
            finish(index, {"status": "failed", "error": f"{type(error).__name__}: {error}"})
            continue
        writer = writers[index]
        writer.write(rows, values)
        if bar is not None:
            bar.advance(len(rows))
        if writer.complete:
            writer.close()
            del writers[index]
            finish(index, {"status": "ok", "tiles": writer.num_tiles})


class _TileProgress:
    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.start = time.perf_counter()
        self.done = 0
        self.progress = Progress(TextColumn("[bold]embed[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task("embed", total=total, rate="")
        self.progress.start()

    def advance(self, n: int) -> None:
        self.done += n
        rate = self.done / max(1e-9, time.perf_counter() - self.start)
        self.progress.update(self.task, advance=n, rate=f"{rate:.1f} tiles/s")

    def close(self) -> None:
        self.progress.stop()


def embed_slide(slide, encoder, *, mpp: float | None = None, size: int | None = None, batch_size: int = 64,
                min_tissue: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Embed one slide in memory: segment tissue, tile at ``mpp``, encode every tile.

    For notebooks and small jobs; batch jobs should use :func:`embed_slides`, which
    streams, resumes and hides I/O behind compute.

    Parameters
    ----------
    slide : Slide or path
    encoder : TileEncoder
    mpp : float, optional
        Tile resolution; default the encoder's native resolution (else 0.5 µm/px).
    size : int, optional
        Tile edge in px; default the encoder's native tile.

    Returns
    -------
    features : (N, D) float32
    coords : (N, 2) int64 level-0 (x, y)

    Examples
    --------
    >>> encoder = histoscope.load_tile_encoder("uni", weights="uni.bin")   # doctest: +SKIP
    >>> features, coords = embed_slide("slide.svs", encoder)                # doctest: +SKIP
    """
    from histoscope.io import Slide, open_slide
    from histoscope.tiling import tile_grid
    from histoscope.tissue import segment_tissue

    if not isinstance(slide, Slide):
        with open_slide(slide) as opened:
            return embed_slide(opened, encoder, mpp=mpp, size=size, batch_size=batch_size, min_tissue=min_tissue)
    mpp = mpp or encoder.spec.native_mpp or 0.5
    size = size or encoder.spec.native_tile
    grid = tile_grid(slide, segment_tissue(slide), size=size, mpp=mpp, min_tissue=min_tissue)
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    features = np.empty((len(grid), encoder.embed_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(grid), batch_size):
            tiles = slide.read_tiles(grid.coords[start : start + batch_size], size=size, mpp=mpp)
            batch = encoder.transform(tiles).to(device=device, dtype=dtype)
            features[start : start + len(tiles)] = encoder(batch).float().cpu().numpy()
    return features, grid.coords
