"""Turning command-line slide arguments (files, folders, globs, CSVs) into slide jobs."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from histoscope.io.columns import csv_reader
from histoscope.io.mpp import mpp_problem

__all__ = ["SlideJob", "collect_slides", "slide_name", "SLIDE_SUFFIXES"]

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".png", ".jpg", ".jpeg",
)
_PATH_COLUMNS = ("path", "slide_path", "slide", "filename")


@dataclass(frozen=True)
class SlideJob:
    """One slide to process: where it is, its output name and its level-0 µm/px override."""

    path: Path
    name: str
    slide_mpp: float | None = None


def slide_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _from_csv(csv_path: Path, slide_mpp: float | None) -> list[SlideJob]:
    reader = csv_reader(csv_path)
    columns = reader.fieldnames or []
    column = next((c for c in _PATH_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(f"{csv_path}: needs a slide path column, one of {_PATH_COLUMNS}; found {columns}")
    jobs = []
    for row_number, row in enumerate(reader, start=2):
        path = Path(row[column] or "")
        if not path.is_absolute():
            path = csv_path.parent / path
        row_mpp = slide_mpp
        if (row.get("mpp") or "").strip():
            try:
                row_mpp = float(row["mpp"])
            except ValueError:
                raise ValueError(f"{csv_path}:{row_number}: mpp {row['mpp']!r} is not a number") from None
            if problem := mpp_problem(row_mpp):
                raise ValueError(f"{csv_path}:{row_number}: mpp {problem}; correct the `mpp` column")
        name = (row.get("slide_id") or "").strip() or slide_name(path)
        jobs.append(SlideJob(path=path, name=name, slide_mpp=row_mpp))
    if not jobs:
        raise ValueError(f"{csv_path}: no slides (a header and no rows); add one row per slide")
    return jobs


def collect_slides(specs: list[str | Path | SlideJob], *, slide_mpp: float | None = None) -> list[SlideJob]:
    """Slide jobs from files, folders (their slide files), glob patterns, CSV files, or
    ``SlideJob``s (kept as they are).

    A CSV needs a ``path`` column (relative paths are relative to the CSV) and may
    have ``slide_id`` and ``mpp`` (which beats ``slide_mpp`` for its row). Missing
    files are kept, so the batch reports them as failed instead of silently
    shrinking. Duplicate output names are an error, since outputs would collide, and so
    are a folder or CSV without slides, or no slides at all: a run that would do nothing.
    """
    if slide_mpp is not None and (problem := mpp_problem(slide_mpp)):
        raise ValueError(f"slide_mpp (--slide-mpp) {problem}")
    jobs: list[SlideJob] = []
    for spec in specs:
        if isinstance(spec, SlideJob):  # already resolved (e.g. by an earlier stage)
            jobs.append(spec)
            continue
        text = str(spec)
        path = Path(text)
        if path.suffix.lower() == ".csv" and path.is_file():
            jobs.extend(_from_csv(path, slide_mpp))
        elif path.is_dir() and not (path / "DICOMDIR").exists() and not any(path.glob("*.dcm")):
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no slide files in this folder (looked for "
                                        f"{', '.join(SLIDE_SUFFIXES)}); pass the folder that holds the slides")
            jobs.extend(SlideJob(p, slide_name(p), slide_mpp) for p in found)
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not found:
                raise FileNotFoundError(f"{text}: the pattern matches no file")
            jobs.extend(SlideJob(p, slide_name(p), slide_mpp) for p in found)
        else:
            jobs.append(SlideJob(path, slide_name(path), slide_mpp))
    if not jobs:
        raise ValueError("no slides given: pass slide files, folders, glob patterns or CSV files")
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.name in seen and seen[job.name] != job.path:
            raise ValueError(
                f"two slides would write outputs named {job.name!r}: {seen[job.name]} and {job.path}; "
                "give them distinct `slide_id`s in a CSV"
            )
        seen[job.name] = job.path
    return list({job.name: job for job in jobs}.values())
