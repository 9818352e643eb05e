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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.encoders.preprocess import normalize_tiles, resize_tiles
from histoscope.io.errors import SlideError
from histoscope.io.features_h5 import FeaturesWriter, features_folder, features_path
from histoscope.io.outdir import OutputFolderError, output_folder
from histoscope.pipeline.batch import BatchResult, RunReport, run_batch
from histoscope.pipeline.executors import Executor
from histoscope.pipeline.inputs import SlideJob, collect_slides
from histoscope.tiling import DEFAULT_MIN_TISSUE, DEFAULT_MPP, DEFAULT_SIZE, TileGeometry, find_patches, read_patches
from histoscope.tiling.dataset import TileSource, start_worker_server, tile_loader
from histoscope.utils.device import resolve_device, resolve_dtype

__all__ = ["EmbedParams", "embed_slide", "embed_slide_job", "embed_slides", "encoder_tiling", "features_done", "prepare_encoder"]


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
        self.devices = [resolve_device(d, option="--devices") for d in params.devices]
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
        encoder, model, dtype = self.replicas[index]
        # (B, 3, h, w) uint8, channels-last: normalised here, on the device, straight into its dtype
        batch = normalize_tiles(batch.to(self.devices[index], non_blocking=True), encoder.spec.preprocess, dtype)
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
                 progress: bool = True, executor: Executor | None = None) -> BatchResult:
    """Embed the tiles of every slide (as listed by ``histoscope tile``) into
    ``out_dir/features_<encoder>/<slide>.h5``.

    Without ``executor`` the slides stream through this process's model (decoding in
    ``params.workers`` processes); with one (e.g. a ``RayExecutor``) each slide is a job
    of its own (:func:`embed_slide_job`) and the files are the same.

    Examples
    --------
    >>> from histoscope.pipeline.embed import EmbedParams, embed_slides      # doctest: +SKIP
    >>> embed_slides(["slides/"], out_dir="out", params=EmbedParams(encoder="uni", weights="uni.bin"))  # doctest: +SKIP
    """
    params = params or EmbedParams()
    out_dir = Path(out_dir)
    jobs = collect_slides(list(slides), slide_mpp=slide_mpp)
    if executor is not None:
        return _embed_by_executor(jobs, out_dir=out_dir, params=params, executor=executor, progress=progress)
    if params.workers > 0:
        start_worker_server()  # decoding workers' start-up overlaps the model's loading
    workers = _DeviceWorkers(params)  # first: a bad checkpoint fails before anything is written
    folder = features_folder(out_dir, params.folder_name)
    try:
        with output_folder(out_dir):
            folder.mkdir(exist_ok=True)
            report = RunReport(folder, "embed")
            run = _EmbedRun(report, workers, folder=folder, params=params)
            try:
                for job in jobs:
                    run.add(job, out_dir)
                run.stream(progress=progress)
            finally:
                run.close()
    except OutputFolderError:
        workers.close()
        raise
    return BatchResult({job.name: report.records[job.name] for job in jobs if job.name in report.records})


def _embed_by_executor(jobs: list[SlideJob], *, out_dir: Path, params: EmbedParams, executor: Executor,
                       progress: bool) -> BatchResult:
    """One job per slide through ``executor``; a slide already embedded is skipped here,
    before any job is sent."""
    encoder, _, _ = prepare_encoder(replace(params, compile=False), torch.device("cpu"))  # a bad checkpoint fails first
    weights_sha256 = encoder.weights_sha256
    del encoder  # the jobs load their own
    folder = features_folder(out_dir, params.folder_name)

    def is_done(job: SlideJob) -> bool:
        try:
            coords, _ = read_patches(find_patches(out_dir, job.name))
        except (OSError, KeyError):
            return False  # the job records why
        return features_done(features_path(folder, job.name), encoder=params.encoder,
                             weights_sha256=weights_sha256, num_tiles=len(coords))

    with output_folder(out_dir):
        folder.mkdir(exist_ok=True)
        return run_batch(jobs, functools.partial(embed_slide_job, out_dir=str(out_dir), params=params),
                         out_dir=folder, stage="embed", is_done=is_done, executor=executor, progress=progress)


# The model of the last parameters a job process used: Ray reuses worker processes, so
# the next slide with the same parameters finds it loaded (one model per process at most).
_loaded: dict[str, _DeviceWorkers] = {}


def embed_slide_job(job: SlideJob, *, out_dir: str | Path, params: EmbedParams) -> dict[str, Any]:
    """Embed one slide into its features file (written under a temporary name, then renamed);
    returns its run-report record. The job of :func:`embed_slides` with an executor.

    Tiles are decoded in this process, one device per job (the first of ``params.devices``):
    parallelism comes from running many slides' jobs at once.
    """
    params = replace(params, devices=params.devices[:1], workers=0)
    key = repr(params)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = _DeviceWorkers(params)
    records = _Records()
    run = _EmbedRun(records, _loaded[key], folder=features_folder(out_dir, params.folder_name), params=params)
    try:
        run.add(job, Path(out_dir))
        run.stream(progress=False)
    finally:
        run.abort_unfinished()
    record = dict(records.records[job.name])
    record.pop("seconds", None)  # timed by the batch
    return record


class _Records:
    """The run-report interface of one job's slide, kept in memory (the batch writes the report)."""

    def __init__(self):
        self.records: dict[str, dict[str, Any]] = {}

    def update(self, job: SlideJob, record: dict[str, Any]) -> None:
        self.records[job.name] = record

    def skipped(self, job: SlideJob) -> None:
        self.records[job.name] = {"status": "ok", "skipped": True}


def encoder_tiling(spec, *, mpp: float | None = None, size: int | None = None) -> tuple[float, int]:
    """``(mpp, size)`` for tiles fed to an encoder: the ones given, else its training geometry
    (e.g. 256 px at 0.5 µm/px for UNI, 224 for Virchow), else the defaults."""
    return mpp or spec.native_mpp or DEFAULT_MPP, size or spec.native_tile or DEFAULT_SIZE


def _slide_geometry(job: SlideJob, attrs: dict[str, Any]) -> TileGeometry:
    """The patches file's tile geometry; TRIDENT's and CLAM's files need the slide's mpp for it."""
    geometry = TileGeometry.from_attrs(attrs)
    if geometry.mpp is None:
        from histoscope.io import open_slide

        with open_slide(job.path, slide_mpp=job.slide_mpp) as slide:
            geometry = TileGeometry.from_attrs(attrs, level0_mpp=slide.mpp)
    return geometry


class _EmbedRun:
    """The slides of one ``embed_slides`` call: their features files filling up as
    batches come back from the devices, each renamed into place when complete."""

    def __init__(self, report: RunReport, workers: _DeviceWorkers, *, folder: Path, params: EmbedParams):
        self.report = report
        self.workers = workers
        self.folder = folder
        self.params = params
        self.jobs: list[SlideJob] = []
        self.sources: list[TileSource] = []
        self.writers: dict[int, FeaturesWriter] = {}
        self.started: dict[int, float] = {}
        self.failed: set[int] = set()
        self.bar: _TileProgress | None = None

    def add(self, job: SlideJob, out_dir: Path) -> None:
        """Queue a slide unless it is already embedded; a slide without tiles is done at once."""
        try:
            coords, attrs = read_patches(find_patches(out_dir, job.name))
        except (OSError, KeyError) as error:
            self.report.update(job, {"status": "failed", "error": f"no tile coordinates for {job.path} "
                                     f"({type(error).__name__}: {error}); run `histoscope tile` on it first"})
            return
        try:
            geometry = _slide_geometry(job, attrs)
        except (ValueError, SlideError) as error:
            self.report.update(job, {"status": "failed", "error": f"{type(error).__name__}: {error}"})
            return
        path = features_path(self.folder, job.name)
        encoder = self.workers.encoder
        if features_done(path, encoder=self.params.encoder, weights_sha256=encoder.weights_sha256,
                         num_tiles=len(coords)):
            self.report.skipped(job)
            return
        index = len(self.jobs)
        self.jobs.append(job)
        self.sources.append(TileSource(str(job.path), coords, size=geometry.size, mpp=geometry.mpp,
                                       slide_mpp=job.slide_mpp))
        self.started[index] = time.perf_counter()
        self.writers[index] = FeaturesWriter(
            path, num_tiles=len(coords), dim=encoder.embed_dim, coords=coords,
            coords_attrs={k: v for k, v in attrs.items() if k != "tissue_fraction"},
            features_attrs={"name": job.name, "encoder": self.params.encoder, "savetodir": str(self.folder),
                            "weights_sha256": encoder.weights_sha256,
                            "weights_path": encoder.weights_source,
                            "dtype": str(self.workers.dtype).replace("torch.", ""), "embed_dim": encoder.embed_dim},
        )
        if self.writers[index].complete:  # no tiles
            self._finish(index)

    def stream(self, *, progress: bool) -> None:
        """Decode every queued tile in the loader's workers and embed it on the devices."""
        total = sum(len(self.sources[i].coords) for i in self.writers)
        self.bar = _TileProgress(total, len(self.writers)) if progress and total else None
        # Resizing runs in the decoding workers, which send uint8 batches (a quarter of the bytes
        # of float ones); a partial of a module-level function pickles cheaply (the encoder
        # itself never leaves this process).
        transform = functools.partial(resize_tiles, preprocess=self.workers.encoder.spec.preprocess)
        # Slides already finished have no tiles, so they yield no chunks.
        loader = tile_loader(self.sources, chunk_size=self.params.batch_size, num_workers=self.params.workers,
                             transform=transform)
        in_flight = 0
        for item in loader:
            index = item["source"]
            if index in self.failed:
                continue
            if "error" in item:
                self._fail(index, item["error"])
                continue
            self.workers.submit((index, item["index"].numpy()), item["tiles"])
            in_flight += 1
            in_flight -= self._drain(block=False)
        while in_flight:
            in_flight -= self._drain(block=True)

    def close(self) -> None:
        """Stop the device threads; drop the temporary files of slides left unfinished."""
        self.workers.close()
        self.abort_unfinished()

    def abort_unfinished(self) -> None:
        """Drop the temporary files of slides left unfinished."""
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _drain(self, *, block: bool) -> int:
        """Write finished batches to their slides' files; returns how many were taken."""
        taken = 0
        while True:
            try:
                (index, rows), values, error = self.workers.results.get(block=block and taken == 0)
            except queue.Empty:
                return taken
            taken += 1
            if index in self.failed:
                continue
            if error is not None:
                self._fail(index, f"{type(error).__name__}: {error}")
                continue
            if not np.isfinite(values).all():  # would become made-up predictions downstream
                self._fail(index, f"the encoder gave NaN or Inf embeddings (tiles {rows[0]}–{rows[-1]}); "
                                  "embed again with --dtype fp32")
                continue
            writer = self.writers[index]
            writer.write(rows, values)
            if self.bar is not None:
                self.bar.advance(len(rows))
            if writer.complete:
                self._finish(index)

    def _finish(self, index: int) -> None:
        writer = self.writers.pop(index)
        writer.close()
        self._record(index, {"status": "ok", "tiles": writer.num_tiles})

    def _fail(self, index: int, error: str) -> None:
        self.failed.add(index)
        self.writers.pop(index).abort()
        self._record(index, {"status": "failed", "error": error})

    def _record(self, index: int, record: dict[str, Any]) -> None:
        record["seconds"] = round(time.perf_counter() - self.started[index], 3)
        self.report.update(self.jobs[index], record)
        if self.bar is not None:
            self.bar.slide_done(self.jobs[index].name, record["status"])


class _TileProgress:
    """Tiles per second and ETA on a terminal; one line per finished slide otherwise."""

    def __init__(self, total: int, slides: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.start = time.perf_counter()
        self.done = 0
        self.slides, self.finished = slides, 0
        self.console = Console(stderr=True)
        self.progress = None
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]embed[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("embed", total=total, rate="")
            self.progress.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            rate = self.done / max(1e-9, time.perf_counter() - self.start)
            self.progress.update(self.task, advance=n, rate=f"{rate:.1f} tiles/s")

    def slide_done(self, name: str, status: str) -> None:
        self.finished += 1
        if self.progress is None:
            self.console.print(f"embed {self.finished}/{self.slides} {name}: {status}", highlight=False, markup=False,
                               soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def embed_slide(slide, encoder, *, mpp: float | None = None, size: int | None = None, batch_size: int = 64,
                min_tissue: float = DEFAULT_MIN_TISSUE) -> tuple[np.ndarray, np.ndarray]:
    """Embed one slide in memory: segment tissue, tile at ``mpp``, encode every tile.

    For notebooks and small jobs; batch jobs should use :func:`embed_slides`, which
    streams, resumes and hides I/O behind compute.

    Parameters
    ----------
    slide : Slide or path
    encoder : TileEncoder
    mpp, size : float, int, optional
        Tile resolution and edge in px; default the encoder's own (see :func:`encoder_tiling`).

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
    mpp, size = encoder_tiling(encoder.spec, mpp=mpp, size=size)
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
