"""Training samples streamed from slides (or image files), one batch per optimisation step.

No tile is ever written to disk: tiles are read with ``open_slide(path).read_tiles`` at
the coordinates of the ``OUT/patches/<slide>_patches.h5`` files ``histoscope tile``
wrote, at their size and µm/px. An image folder is the alternative input.

**Order.** Each pass over the data is a deterministic function of ``(seed, pass)``:
the samples are cut into chunks of ``chunk`` consecutive tiles of one slide, the chunks
are shuffled, and the chunk stream goes through a shuffle buffer of ``buffer`` samples
(draw a random buffer slot, emit it, put the next sample there). So a batch mixes many
slides while only about ``buffer / chunk`` slides are read from at a time. Passes are
concatenated into an endless stream; global batch ``step`` is positions
``[step * G, (step + 1) * G)`` of it.

**Sharding.** Rank r of R takes its ``G / R`` consecutive positions of every global batch;
data-loader worker w of W produces the steps ``w, w + W, ...``. Every random draw of a
sample (its augmentation) is seeded by ``(seed, position)`` and every per-step draw
(masks) by ``(seed, step)``, so the data of a step do not depend on the number of ranks,
workers, or on where a run was resumed: a killed run restarts at its next step.

Notation: G global batch, b = G / R per rank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["ImageFiles", "SlideTiles", "StepStream", "TileIndex", "find_images", "find_slide_tiles",
           "sample_order", "step_loader"]


@dataclass(frozen=True)
class SlideTiles:
    """The tiles of one slide, as listed by its patches file."""

    name: str
    path: str
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    size: int  # px at ``mpp``
    mpp: float | None  # target µm/px (None: level 0 as stored)
    slide_mpp: float | None = None  # level-0 µm/px recorded at tiling (used if the slide lacks it)


@dataclass(frozen=True)
class ImageFiles:
    """Image files, one sample each."""

    paths: tuple[str, ...]


def _patches_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "patches").is_dir():
        path = path / "patches"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such patches file or folder (give `histoscope tile`'s OUT folder, "
                                "its patches/ folder, or *_patches.h5 files)")
    return sorted(path.glob("*.h5"))


def _slide_name(patches_file: Path) -> str:
    return patches_file.name.removesuffix(".h5").removesuffix("_patches")


def find_slide_tiles(patches: Sequence[str | Path], *, slide_dir: str | Path | None = None,
                     log: Callable[[str], None] = print) -> list[SlideTiles]:
    """The slides and tile coordinates of patches files (files, patches/ folders or tile OUT folders).

    A slide is found at the path its patches file records, else as ``slide_dir/<slide>.*``.
    Slides that cannot be found or have no tiles are reported through ``log`` and skipped.
    """
    from histoscope.tiling import TileGeometry, read_patches

    found: list[SlideTiles] = []
    files = [f for p in patches for f in _patches_files(Path(p))]
    if not files:
        raise FileNotFoundError(f"no patches files in {', '.join(map(str, patches))}; run `histoscope tile` first")
    for file in files:
        name = _slide_name(file)
        coords, attrs = read_patches(file)
        path = _locate_slide(name, attrs.get("slide_path", ""), slide_dir)
        if path is None:
            log(f"skipping {name}: slide not found (recorded path {attrs.get('slide_path') or 'none'}; "
                "pass data.slide_dir=FOLDER)")
            continue
        if len(coords) == 0:
            log(f"skipping {name}: no tiles in {file}")
            continue
        geometry = TileGeometry.from_attrs(attrs)
        found.append(SlideTiles(name=name, path=str(path), coords=coords, size=geometry.size, mpp=geometry.mpp,
                                slide_mpp=geometry.level0_mpp))
    if not found:
        raise FileNotFoundError(f"none of the {len(files)} patches files points to a readable slide with tiles")
    return found


def _locate_slide(name: str, recorded: str, slide_dir) -> Path | None:
    if recorded and Path(recorded).exists():
        return Path(recorded)
    if slide_dir is not None:
        matches = sorted(p for p in Path(slide_dir).glob(f"{name}.*") if p.is_file())
        if matches:
            return matches[0]
    return None


def find_images(folder: str | Path) -> ImageFiles:
    """Every image file under ``folder`` (recursively, sorted)."""
    from histoscope.io.image_backend import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    paths = tuple(str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFiles(paths)


class TileIndex:
    """Sample ``i`` of slides' tiles (slide by slide, in patches-file order) or of image files."""

    def __init__(self, source: Sequence[SlideTiles] | ImageFiles):
        if isinstance(source, ImageFiles):
            self.slides: list[SlideTiles] = []
            self.images = source.paths
            self.group_sizes = np.array([len(self.images)])
        else:
            self.slides = list(source)
            self.images = ()
            self.group_sizes = np.array([len(s.coords) for s in self.slides])
        self.offsets = np.concatenate([[0], np.cumsum(self.group_sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> str:
        if self.images:
            return f"{len(self.images)} images"
        return f"{len(self)} tiles from {len(self.slides)} slides"

    def reader(self, *, max_open: int = 16) -> TileReader:
        return TileReader(self, max_open=max_open)


class TileReader:
    """Reads samples as (H, W, 3) uint8 arrays, keeping up to ``max_open`` slides open."""

    def __init__(self, index: TileIndex, *, max_open: int):
        self.index = index
        self.max_open = max_open
        self.opened: OrderedDict[int, Any] = OrderedDict()

    def read(self, positions: np.ndarray) -> tuple[list[np.ndarray | None], list[str]]:
        """Samples at ``positions`` (None where unreadable) and one error line per failure."""
        out: list[np.ndarray | None] = [None] * len(positions)
        errors = []
        if self.index.images:
            from PIL import Image

            for k, i in enumerate(positions):
                try:
                    with Image.open(self.index.images[i]) as image:
                        out[k] = np.asarray(image.convert("RGB"))
                except OSError as error:
                    errors.append(f"{self.index.images[i]}: {error}")
            return out, errors
        groups = np.searchsorted(self.index.offsets, positions, side="right") - 1
        for group in np.unique(groups):
            ks = np.flatnonzero(groups == group)
            source = self.index.slides[group]
            rows = positions[ks] - self.index.offsets[group]
            try:
                tiles = self._slide(group).read_tiles(source.coords[rows], size=source.size, mpp=source.mpp)
            except Exception as error:  # one unreadable slide must not stop training: reported, replaced
                errors.append(f"{source.path}: {type(error).__name__}: {error}")
                continue
            for k, tile in zip(ks, tiles):
                out[k] = tile
        return out, errors

    def _slide(self, group: int):
        from histoscope.io import open_slide

        slide = self.opened.get(group)
        if slide is None:
            source = self.index.slides[group]
            slide = open_slide(source.path, slide_mpp=source.slide_mpp)
            self.opened[group] = slide
            if len(self.opened) > self.max_open:
                self.opened.popitem(last=False)[1].close()
        else:
            self.opened.move_to_end(group)
        return slide

    def close(self) -> None:
        for slide in self.opened.values():
            slide.close()
        self.opened.clear()


def sample_order(group_sizes: np.ndarray, *, chunk: int, buffer: int, seed: int, epoch: int) -> np.ndarray:
    """All sample indices once, in pass ``epoch``'s order: shuffled chunks through a shuffle buffer."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    offsets = np.concatenate([[0], np.cumsum(group_sizes)])
    starts = np.concatenate([np.arange(o, o + n, chunk) for o, n in zip(offsets[:-1], group_sizes) if n > 0])
    ends = np.minimum(starts + chunk, np.repeat(offsets[1:], [len(range(0, n, chunk)) for n in group_sizes]))
    permuted = rng.permutation(len(starts))
    stream = np.concatenate([np.arange(starts[c], ends[c]) for c in permuted])
    buffer = max(1, min(buffer, len(stream)))
    out = np.empty(len(stream), dtype=np.int64)
    slots = stream[:buffer].copy()
    draws = rng.integers(0, buffer, size=len(stream) - buffer)
    for n, (incoming, slot) in enumerate(zip(stream[buffer:].tolist(), draws.tolist())):
        out[n] = slots[slot]
        slots[slot] = incoming
    out[len(stream) - buffer :] = rng.permutation(slots)
    return out


Collate = Callable[..., dict[str, torch.Tensor]]


class StepStream(IterableDataset):
    """Yields this rank's batch of every step in ``[start_step, stop_step)``, in order.

    ``collate(tiles, positions=, step=, rank=, world_size=, seed=)`` turns the rank's b uint8
    tiles into the objective's batch (e.g. augmented crops and masks); it runs in the
    data-loader workers and must be picklable.
    """

    def __init__(self, index: TileIndex, *, collate: Collate, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int, stop_step: int, chunk: int = 64, buffer: int = 4096):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
        self.index, self.collate = index, collate
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.chunk, self.buffer = chunk, buffer
        self._orders: dict[int, np.ndarray] = {}

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of this rank's samples at ``step``: (b,) int64."""
        per_rank = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * per_rank
        return np.arange(first, first + per_rank, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two passes
                self._orders.pop(min(self._orders))
            self._orders[epoch] = sample_order(self.index.group_sizes, chunk=self.chunk, buffer=self.buffer,
                                               seed=self.seed, epoch=epoch)
        return self._orders[epoch]

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at stream ``positions``."""
        n = len(self.index)
        return np.array([self._order(int(p // n))[p % n] for p in positions], dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = self.index.reader(max_open=max(4, self.buffer // max(1, self.chunk) + 2))
        try:
            for step in range(self.start_step + worker, self.stop_step, workers):
                positions = self.positions(step)
                tiles, errors = reader.read(self.samples(positions))
                good = [t for t in tiles if t is not None]
                if not good:
                    raise RuntimeError(f"step {step}: no sample of the batch could be read: {'; '.join(errors)}")
                tiles = [t if t is not None else good[0] for t in tiles]  # deterministic stand-in
                batch = self.collate(tiles, positions=positions, step=step, rank=self.rank,
                                     world_size=self.world_size, seed=self.seed)
                yield {**batch, "step": step, "read_errors": errors}
        finally:
            reader.close()


def step_loader(stream: StepStream, *, workers: int, prefetch: int = 2) -> DataLoader:
    """A DataLoader over :class:`StepStream` batches (workers forked from a clean server)."""
    if workers <= 0:
        return DataLoader(stream, batch_size=None, num_workers=0, collate_fn=_keep)
    from histoscope.tiling.dataset import single_threaded_worker, worker_context

    return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                      worker_init_fn=single_threaded_worker, multiprocessing_context=worker_context(),
                      collate_fn=_keep)


def _keep(batch):
    return batch
