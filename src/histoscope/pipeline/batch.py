"""Batch runs over many slides: parallel, resumable, one record per slide.

``OUT/run_report.json`` holds one record per slide (status, tiles, seconds, error)
and is rewritten atomically after every slide, so a killed run leaves a valid report
and a rerun skips what is done. Records of earlier runs for slides not in this run
are kept.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscope.io.atomic import remove_stale_partials, write_json
from histoscope.io.outdir import output_folder
from histoscope.pipeline.executors import Executor, LocalExecutor
from histoscope.pipeline.inputs import SlideJob

__all__ = ["BatchResult", "RunReport", "run_batch", "report_path", "REPORT_NAME", "progress_bar"]

REPORT_NAME = "run_report.json"


def report_path(out_dir: str | Path) -> Path:
    """``OUT/run_report.json``: the record of every slide a stage has run on in ``out_dir``."""
    return Path(out_dir) / REPORT_NAME


@dataclass
class BatchResult:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.records.items() if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


class _Timed:
    """Picklable wrapper timing ``fn(job)`` and turning exceptions into records."""

    def __init__(self, fn: Callable[[SlideJob], dict[str, Any]]):
        self.fn = fn

    def __call__(self, job: SlideJob) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            record = {"status": "ok", **self.fn(job)}
        except Exception as error:  # one bad slide is a record, not the end of the batch
            record = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=6),
            }
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record


class RunReport:
    """``OUT/run_report.json``: one record per slide, rewritten atomically on every update.

    Records of slides from earlier runs are kept, so one report describes a whole
    output folder across resumed and repeated runs.
    """

    def __init__(self, out_dir: str | Path, stage: str):
        self.path = report_path(out_dir)
        self.stage = stage
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}  # written atomically, so this is a foreign file; start afresh
            self.records = {r["slide"]: r for r in data.get("slides", []) if "slide" in r}

    def update(self, job: SlideJob, record: dict[str, Any]) -> dict[str, Any]:
        self.records[job.name] = {"slide": job.name, "path": str(job.path), "stage": self.stage, **record}
        self.save()
        return self.records[job.name]

    def skipped(self, job: SlideJob) -> dict[str, Any]:
        previous = self.records.get(job.name, {})
        return self.update(job, {**{k: v for k, v in previous.items() if k not in ("slide", "path", "stage")},
                                 "status": "ok", "skipped": True})

    def save(self) -> None:
        write_json(self.path, {"stage": self.stage, "slides": list(self.records.values())})


def run_batch(
    jobs: list[SlideJob],
    fn: Callable[[SlideJob], dict[str, Any]],
    *,
    out_dir: str | Path,
    stage: str,
    is_done: Callable[[SlideJob], bool] | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> BatchResult:
    """Run ``fn`` on every job not already done, recording each in the run report.

    ``fn`` runs in worker processes, so it must be picklable (a module-level
    function or ``functools.partial`` of one) and return a JSON-able dict. The run
    holds ``out_dir``'s lock (:func:`~histoscope.io.outdir.output_folder`).
    """
    with output_folder(out_dir):
        report = RunReport(out_dir, stage)
        executor = executor or LocalExecutor(workers=1)
        todo: list[SlideJob] = []
        for job in jobs:
            if is_done is not None and is_done(job):
                report.skipped(job)
            else:
                todo.append(job)
        report.save()
        bar = progress_bar(len(todo), stage) if progress and todo else None
        try:
            for index, result in executor.map(_Timed(fn), todo):
                job = todo[index]
                if isinstance(result, BaseException):  # the worker itself died
                    result = {"status": "failed", "error": f"{type(result).__name__}: {result}", "seconds": None}
                report.update(job, result)
                if bar is not None:
                    bar.advance(job.name, result["status"])
        finally:
            if bar is not None:
                bar.close()
        # Every worker of this run is done, and the folder's lock is held: a worker killed
        # mid-slide (its slide retried or reported) left a temporary file, remove it now.
        remove_stale_partials(out_dir)
    return BatchResult({job.name: report.records[job.name] for job in jobs})


class progress_bar:
    """Progress on stderr: a rich bar with slide counts, failures and ETA on a terminal;
    one line per finished slide otherwise (a batch job's log file, a pipe)."""

    def __init__(self, total: int, stage: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.stage, self.total, self.done, self.failed = stage, total, 0, 0
        self.console = Console(stderr=True)
        self.progress = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task(stage, total=total, status="")
            self.progress.start()

    def advance(self, name: str, status: str) -> None:
        self.done += 1
        self.failed += status == "failed"
        if self.progress is None:
            self.console.print(f"{self.stage} {self.done}/{self.total} {name}: {status}", highlight=False, markup=False,
                               soft_wrap=True)
            return
        label = f"{name}" + (f" [red]{self.failed} failed[/]" if self.failed else "")
        self.progress.update(self.task, advance=1, status=label)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
