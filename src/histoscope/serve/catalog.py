"""What the server may show: the slides under its roots and a run's outputs under OUT.

Nothing a request says is ever turned into a path. Slides are found by walking the
``--slides`` roots once (symlinks are followed only when their target stays inside
the root), and a request's slide id is looked up in that table; output files are
the stages' own path functions of a known slide id, read only when their resolved
path stays inside OUT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoscope.io.slide import Slide
from histoscope.pipeline.inputs import SLIDE_SUFFIXES, slide_name

__all__ = ["Catalog", "SlideEntry", "inside"]

log = logging.getLogger(__name__)

# Slides found per root at most: a root pointed at "/" must not walk the whole disk.
MAX_SLIDES = 100_000
# Seconds between two walks of the slide roots (a listing walks them again when older).
RESCAN_SECONDS = 10.0
_SUFFIXES = tuple(SLIDE_SUFFIXES)


def inside(root: Path, path: Path) -> Path | None:
    """``path`` resolved, if it exists and stays inside ``root`` (resolved); else None."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return resolved if resolved.is_relative_to(root.resolve()) else None


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: Path  # resolved, inside ``root``
    root: Path


def _walk(root: Path) -> Iterator[Path]:
    """Slide files (and DICOM/MIRAX folders' files) under ``root``, without leaving it."""
    root = root.resolve()
    count = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(_SUFFIXES):
                continue
            resolved = inside(root, Path(folder) / name)
            if resolved is None or not resolved.is_file():
                log.warning("skipping %s: it resolves outside the slide root %s", Path(folder) / name, root)
                continue
            yield resolved
            count += 1
            if count >= MAX_SLIDES:
                return


class _HandlePool:
    """Up to ``size`` open readers of one slide, each used by one thread at a time."""

    def __init__(self, opener, size: int):
        self._opener, self._size = opener, size
        self._idle: queue.LifoQueue[Slide] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self.closed = False

    @contextlib.contextmanager
    def lease(self) -> Iterator[Slide]:
        try:
            slide = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                create = self._created < self._size
                self._created += create
            slide = self._opener() if create else self._idle.get()
        try:
            yield slide
        finally:
            if self.closed:  # dropped while in use: its last user closes it
                slide.close()
            else:
                self._idle.put(slide)

    def close(self) -> None:
        """Close the idle readers now and the busy ones when they come back."""
        self.closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class Catalog:
    """Slides by id, their metadata, and the outputs of OUT that belong to them."""

    def __init__(self, out_dir: str | Path, slide_roots: Sequence[str | Path], *, handles_per_slide: int = 3,
                 open_slides: int = 4):
        self.out_dir = Path(out_dir).resolve()
        self.roots = [Path(root).resolve() for root in slide_roots]
        self.handles_per_slide = handles_per_slide
        # Slides kept open, least recently used first: each reader holds its own cache of
        # decoded tiles, so memory is bounded by open_slides x handles_per_slide readers.
        self.open_slides = open_slides
        self._pools: OrderedDict[str, _HandlePool] = OrderedDict()
        self._info: dict[str, tuple[str, dict[str, Any]]] = {}  # slide id -> (file tag, metadata)
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self.slides: dict[str, SlideEntry] = self._scan(warn=True)
        self._scanned = time.monotonic()

    def _scan(self, *, warn: bool = False) -> dict[str, SlideEntry]:
        slides: dict[str, SlideEntry] = {}
        for root in self.roots:
            for path in _walk(root):
                slide_id = slide_name(path)
                if slide_id in slides:
                    if warn:
                        log.warning("%s: slide id %r already taken by %s; skipped", path, slide_id,
                                    slides[slide_id].path)
                    continue
                slides[slide_id] = SlideEntry(slide_id, path, root)
        return slides

    def refresh(self, *, min_interval: float = RESCAN_SECONDS) -> None:
        """Walk the roots again (at most every ``min_interval`` s): slides written since appear,
        removed ones go, and a slide whose file changed is reopened."""
        if time.monotonic() - self._scanned < min_interval or not self._scan_lock.acquire(blocking=False):
            return
        try:
            slides = self._scan()
            for slide_id, entry in self.slides.items():
                if slides.get(slide_id) != entry:
                    self._forget(slide_id)
            self.slides = slides
            self._scanned = time.monotonic()
        finally:
            self._scan_lock.release()

    def _forget(self, slide_id: str) -> None:
        """Drop what is known of a slide and close its readers (the file is gone or changed)."""
        self._info.pop(slide_id, None)
        with self._lock:
            pool = self._pools.pop(slide_id, None)
        if pool is not None:
            pool.close()

    def entry(self, slide_id: str) -> SlideEntry:
        """The slide called ``slide_id``; KeyError if there is none."""
        return self.slides[slide_id]

    @contextlib.contextmanager
    def open(self, slide_id: str) -> Iterator[Slide]:
        """An open reader of the slide, for this thread alone while the block runs."""
        entry = self.entry(slide_id)
        with self._lock:
            pool = self._pools.get(slide_id)
            if pool is None:
                from histoscope.io import open_slide

                pool = self._pools[slide_id] = _HandlePool(lambda: open_slide(entry.path), self.handles_per_slide)
                while len(self._pools) > self.open_slides:
                    self._pools.popitem(last=False)[1].close()
            self._pools.move_to_end(slide_id)
        with pool.lease() as slide:
            yield slide

    def info(self, slide_id: str) -> dict[str, Any]:
        """Metadata of one slide: size, resolution, levels, reader; ``error`` if unreadable. Cached
        while the file stays the same (a changed file is reopened)."""
        entry = self.entry(slide_id)
        try:
            tag = self.mtime_tag(slide_id)
        except OSError:  # removed since the last scan
            self._forget(slide_id)
            return {"slide_id": slide_id, "error": "the slide file is gone"}
        cached = self._info.get(slide_id)
        if cached is not None and cached[0] == tag:
            return cached[1]
        if cached is not None:
            self._forget(slide_id)
        try:
            with self.open(slide_id) as slide:
                info = {
                    "slide_id": slide_id, "width": slide.dimensions[0], "height": slide.dimensions[1],
                    "mpp": slide.metadata_mpp, "backend": slide.backend, "vendor": slide.vendor,
                    "levels": [{"width": l.width, "height": l.height, "downsample": l.downsample}
                               for l in slide.levels],
                }
        except Exception as error:  # one unreadable slide is listed with its error, never fatal
            info = {"slide_id": slide_id, "error": f"{type(error).__name__}: {error}".replace(str(entry.root), "")}
        self._info[slide_id] = (tag, info)
        return info

    def mtime_tag(self, slide_id: str) -> str:
        """Changes when the slide file changes (size and modification time): part of tile ETags."""
        stat = self.entry(slide_id).path.stat()
        return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"

    def output(self, path: Path) -> Path | None:
        """``path`` (an output path of OUT) resolved, if it is a file inside OUT."""
        resolved = inside(self.out_dir, path)
        return resolved if resolved is not None and resolved.is_file() else None

    def output_dirs(self) -> list[Path]:
        """OUT and its immediate subfolders (prediction and report runs written beside the tiles)."""
        found = [self.out_dir]
        with contextlib.suppress(OSError):
            for child in sorted(self.out_dir.iterdir()):
                if child.name.startswith(".") or not child.is_dir():
                    continue
                resolved = inside(self.out_dir, child)
                if resolved is not None:
                    found.append(resolved)
        return found
