"""``histoscope report``: pathology reports written by a report model from slides' tile features.

Output folder::

    OUT/reports.csv     slide_id, report (one row per slide that succeeded)
    OUT/reports.json    the same with the model, prompt and decoding settings, and the failed slides
    OUT/<slide>.txt     each report on its own
    OUT/run_report.json status of every slide and the hash of the settings its report was written with
    OUT/<slide>/words/NN_<word>.csv, .geojson   with ``heatmaps``: each word's attention over the tiles

Inputs are features files (``<slide>.h5``), folders of them, or CSV files with a
``features`` (or ``path``) column and an optional ``slide_id`` column. A features file
that is missing, unreadable, empty or of the wrong dim fails its slide only; the
others are written.

Notation: B slides per batch, N tiles, D feature dim, T tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.encoders.weights import sha256_file
from histoscope.io.atomic import atomic_path, remove_stale_partials, write_json
from histoscope.io.columns import write_columns
from histoscope.io.features_h5 import FeaturesError, check_finite, collect_features, read_features
from histoscope.io.outdir import output_folder
from histoscope.language.generation import left_pad
from histoscope.language.report_attention import token_tile_attention, word_spans
from histoscope.language.report_text import decode_report, prompt_ids
from histoscope.language.trained_report import ReportRun, load_report_run, report_run_files
from histoscope.pipeline.batch import RunReport
from histoscope.pipeline.executors import Executor, LocalExecutor
from histoscope.pipeline.inputs import SlideJob
from histoscope.predict.heatmap import tiles_geojson, write_tile_scores
from histoscope.slide.bags import collate_bags
from histoscope.tiling.geometry import TileGeometry
from histoscope.utils.device import autocast, resolve_device, resolve_dtype

_DEFAULT_NEW_TOKENS = 256

__all__ = ["DecodeSettings", "ReportResult", "collect_features", "generate_batch", "report_batch",
           "report_text_path", "reports_path", "settings_sha256", "write_reports", "write_word_heatmaps"]


def reports_path(out_dir: str | Path, suffix: str = ".csv") -> Path:
    """``OUT/reports.csv`` (or ``.json``): the reports of a ``histoscope report`` run."""
    return (Path(out_dir) / "reports").with_suffix(suffix)


@dataclass(frozen=True)
class DecodeSettings:
    """How reports are decoded (``model.generate``'s arguments)."""

    max_new_tokens: int | None = None  # None: up to 256, as many as the model has positions for
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    seed: int | None = None


@dataclass
class ReportResult:
    reports: dict[str, str]  # slide_id → report, this run's and earlier runs' with the same settings
    failed: dict[str, str]  # slide_id → error
    skipped: list[str] = field(default_factory=list)  # slides whose report an earlier run wrote


def _read_slide(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such features file")
    features, coords, attrs = read_features(path)
    if features.ndim != 2 or features.shape[1] != dim or len(features) == 0:
        raise FeaturesError(path, f"features of shape {features.shape}; the model reads (N > 0, {dim}): tiles "
                                  "embedded by the encoder it was trained on")
    check_finite(path, features)
    return features, coords, attrs


def generate_batch(run: ReportRun, slides: list[np.ndarray], *, prompt: str, settings: DecodeSettings,
                   device: torch.device, dtype: torch.dtype) -> list[list[int]]:
    """Generated ids (after the prompt) for a batch of slides' features ``[(N_i, D)]``,
    padded into one ``generate`` call."""
    features, _, mask = collate_bags([(f, np.zeros((len(f), 2))) for f in slides])
    prompt_tokens = prompt_ids(run.tokenizer, prompt)
    ids, attention = left_pad([prompt_tokens] * len(slides), pad_token_id=run.tokenizer.pad_token_id, device=device)
    decoding = asdict(settings)
    if decoding["max_new_tokens"] is None:
        decoding["max_new_tokens"] = min(_DEFAULT_NEW_TOKENS,
                                         run.model.config.max_position_embeddings - len(prompt_tokens))
    with autocast(device, dtype):
        out = run.model.generate(ids, features.to(device), mask.to(device), attention_mask=attention,
                                 eos_token_id=run.tokenizer.eos_token_id, pad_token_id=run.tokenizer.pad_token_id,
                                 **decoding)
    return [row[ids.shape[1]:].tolist() for row in out]


def _end_at_eos(tokenizer, ids: list[int]) -> list[int]:
    return ids[:ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids


def write_word_heatmaps(folder: Path, run: ReportRun, prompt: list[int], report: list[int], features: np.ndarray,
                        coords: np.ndarray, attrs: dict[str, Any], device: torch.device) -> int:
    """Each word's attention over the tiles: ``folder/NN_<word>.csv`` (x, y, score,
    percentile) and, when the file records its tile geometry, ``.geojson`` for QuPath;
    returns the number of words."""
    ids = torch.tensor([prompt + report], device=device)
    attention = token_tile_attention(run.model, ids, torch.from_numpy(features)[None]).cpu().numpy()  # (T, N)
    try:
        size = TileGeometry.from_attrs(attrs).size_level0
    except ValueError:
        size = None
    words = word_spans(run.tokenizer, report)
    for number, (word, positions) in enumerate(words):
        # the rows that predicted the word's tokens: token t is written while reading t - 1
        scores = attention[[len(prompt) + p - 1 for p in positions]].mean(0).astype(np.float64)
        stem = folder / f"{number:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', word).strip('_')[:40] or 'word'}"
        write_tile_scores(stem.with_suffix(".csv"), coords, scores)
        if size is not None:
            write_json(stem.with_suffix(".geojson"), tiles_geojson(coords, size, scores))
    return len(words)


def settings_sha256(model: str | Path, tokenizer: str | Path | None, *, prompt: str, settings: DecodeSettings,
                    precision: str, heatmaps: bool) -> str:
    """A short hash of what a report depends on: the checkpoint's and tokenizer's bytes, the
    prompt and the decoding settings. A rerun with another one regenerates every slide."""
    model_file, tokenizer_dir = report_run_files(model, tokenizer)
    digest = hashlib.sha256(sha256_file(model_file).encode())
    for file in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file()):
        digest.update(f"|{file.relative_to(tokenizer_dir).as_posix()}:{sha256_file(file)}".encode())
    digest.update(json.dumps({"prompt": prompt, "decoding": asdict(settings), "precision": precision,
                              "heatmaps": heatmaps}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# The report model of the last (model, tokenizer, device) a process used: Ray reuses worker
# processes, so the next batch finds it loaded (one model per process at most).
_loaded: dict[tuple[str, str, str], ReportRun] = {}


def _report_run(model: str | Path, tokenizer: str | Path | None, device: torch.device) -> ReportRun:
    key = (str(model), str(tokenizer), str(device))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_report_run(model, tokenizer=tokenizer, device=device)
    return _loaded[key]


def report_batch(slides: Sequence[tuple[str, str]], *, model: str, tokenizer: str | None, out_dir: str, prompt: str,
                 settings: DecodeSettings, device: str, precision: str, heatmaps: bool) -> dict[str, dict[str, Any]]:
    """Write the reports of a batch of ``(slide_id, features file)`` in one ``generate`` call:
    ``OUT/<slide>.txt`` (atomically, last) and the word heatmaps. Returns each slide's record,
    ``{"status": "ok", "tiles": N}`` or ``{"status": "failed", "error": …}``. The job of
    :func:`write_reports`, in this process or on a Ray worker (the model loaded once per process)."""
    torch_device = resolve_device(device)
    run = _report_run(model, tokenizer, torch_device)
    out = Path(out_dir)
    records: dict[str, dict[str, Any]] = {}
    batch: list[tuple[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]] = []
    for slide_id, path in slides:
        try:
            batch.append((slide_id, _read_slide(Path(path), run.model.dim_feats)))
        except (OSError, ValueError) as error:
            records[slide_id] = {"status": "failed", "error": str(error)}
    if not batch:
        return records
    generated = generate_batch(run, [slide[0] for _, slide in batch], prompt=prompt, settings=settings,
                               device=torch_device, dtype=resolve_dtype(precision, torch_device))
    for (slide_id, slide), ids in zip(batch, generated):
        if heatmaps:
            write_word_heatmaps(out / slide_id / "words", run, prompt_ids(run.tokenizer, prompt),
                                _end_at_eos(run.tokenizer, ids), *slide, device=torch_device)
        with atomic_path(report_text_path(out, slide_id)) as tmp:
            tmp.write_bytes((decode_report(run.tokenizer, ids) + "\n").encode())
        records[slide_id] = {"status": "ok", "tiles": len(slide[0])}
    return records


def report_text_path(out_dir: str | Path, slide_id: str) -> Path:
    """``OUT/<slide>.txt``: one slide's report."""
    return Path(out_dir) / f"{slide_id}.txt"


def _read_report(out_dir: Path, slide_id: str) -> str:
    return report_text_path(out_dir, slide_id).read_bytes().decode().removesuffix("\n")


def write_reports(features: Sequence[str | Path], *, model: str | Path, out_dir: str | Path,
                  tokenizer: str | Path | None = None, prompt: str | None = None,
                  settings: DecodeSettings = DecodeSettings(), batch_size: int = 8, device: str = "auto",
                  precision: str = "fp32", heatmaps: bool = False, executor: Executor | None = None,
                  log: Callable[[str], None] | None = None) -> ReportResult:
    """Write a report for every slide; one that fails is recorded and the others finish.

    A rerun into the same folder with the same model, tokenizer, prompt and settings skips
    the slides whose report is there (``OUT/run_report.json`` records each slide's
    :func:`settings_sha256`) and leaves their files untouched; the tables list the reports
    of this run and of earlier ones with the same settings. Other settings regenerate.

    Parameters
    ----------
    features : sequence of path
        Features files, folders of them, or CSV tables (see the module docstring).
    model : path
        A ``train-report`` folder, its ``model.pt``, or published HistoGPT weights.
    tokenizer : path, optional
        Tokenizer folder (required for published weights: BioGPT's).
    prompt : str, optional
        Default: the one the model was trained with ("Final diagnosis:").
    settings : DecodeSettings
        Greedy by default; sampling or beam search.
    heatmaps : bool
        Also write each word's attention over the tiles to ``OUT/<slide>/words/``
        (:func:`write_word_heatmaps`).
    executor : Executor, optional
        Runs the batches of ``batch_size`` slides (default: one after another in this
        process; a ``RayExecutor`` runs each batch as a Ray task, the model loaded once per
        worker).
    """
    log = log or (lambda message: None)
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = collect_features(features)
    if not jobs:
        raise FileNotFoundError("no features files given; pass .h5 files, folders of them or a CSV")
    # a bad checkpoint or tokenizer fails here, once; the jobs load their own copy unless run here
    run = _report_run(model, tokenizer, resolve_device(device) if executor is None else torch.device("cpu"))
    prompt = run.prompt if prompt is None else prompt
    meta = run.meta
    if executor is not None:
        del run
        _loaded.clear()
    digest = settings_sha256(model, tokenizer, prompt=prompt, settings=settings, precision=precision,
                             heatmaps=heatmaps)
    fn = functools.partial(report_batch, model=str(model), tokenizer=None if tokenizer is None else str(tokenizer),
                           out_dir=str(out_dir), prompt=prompt, settings=settings, device=device,
                           precision=precision, heatmaps=heatmaps)
    with output_folder(out_dir):
        runs = RunReport(out_dir, "report")
        earlier = list(runs.records)
        slides = {slide_id: SlideJob(path, slide_id) for slide_id, path in jobs}

        def done(job: SlideJob) -> bool:
            record = runs.records.get(job.name, {})
            return (record.get("status") == "ok" and record.get("settings_sha256") == digest
                    and record.get("path") == str(job.path) and report_text_path(out_dir, job.name).is_file())

        skipped = [job for job in slides.values() if done(job)]
        for job in skipped:
            runs.skipped(job)
        runs.save()
        finished = {job.name for job in skipped}
        todo = [job for job in slides.values() if job.name not in finished]
        if skipped:
            log(f"{len(skipped)} of {len(slides)} reports already written with these settings")
        batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
        written = 0
        for index, result in (executor or LocalExecutor(workers=0)).map(
                fn, [[(job.name, str(job.path)) for job in batch] for batch in batches]):
            if isinstance(result, BaseException):  # the batch's generate call failed, or its worker died
                result = {job.name: {"status": "failed", "error": f"{type(result).__name__}: {result}"}
                          for job in batches[index]}
            for slide_id, record in result.items():
                if record["status"] == "ok":
                    record["settings_sha256"] = digest
                    written += 1
                else:
                    log(f"FAILED {slide_id}: {record['error']}")
                runs.update(slides[slide_id], record)
            log(f"{written} of {len(todo)} reports written")
        remove_stale_partials(out_dir)  # a worker killed mid-slide left its temporary file
        reports, failed = _results(out_dir, runs, earlier, list(slides), digest)
        _write_tables(out_dir, reports, failed, model=model, prompt=prompt, settings=settings, meta=meta,
                      digest=digest)
    return ReportResult(reports, failed, skipped=[job.name for job in skipped])


def _results(out_dir: Path, runs: RunReport, earlier: list[str], slides: list[str],
             digest: str) -> tuple[dict[str, str], dict[str, str]]:
    """The reports written with ``digest`` (this run's and earlier runs') and this run's failures;
    the run report put in a fixed order first: earlier runs' slides in their order, then this
    run's new ones in the order given, so the tables are the same however a run was split and
    whichever batch finished first."""
    known, current = set(earlier), set(slides)
    runs.records = {s: runs.records[s] for s in [*earlier, *(s for s in slides if s not in known)]}
    runs.save()
    reports: dict[str, str] = {}
    failed: dict[str, str] = {}
    for slide_id, record in runs.records.items():
        if record.get("status") == "ok" and record.get("settings_sha256") == digest:
            try:
                reports[slide_id] = _read_report(out_dir, slide_id)
            except FileNotFoundError:  # removed since: no longer a result
                pass
        elif slide_id in current:
            failed[slide_id] = record.get("error", "failed")
    return reports, failed


def _write_tables(out_dir: Path, reports: dict[str, str], failed: dict[str, str], *, model, prompt: str,
                  settings: DecodeSettings, meta: dict[str, Any], digest: str) -> None:
    write_json(reports_path(out_dir, ".json"), {
        "model": str(model), "architecture": meta.get("histoscope_model"), "prompt": prompt,
        "decoding": asdict(settings), "settings_sha256": digest,
        "reports": [{"slide_id": k, "report": v} for k, v in reports.items()], "failed": failed})
    if reports:
        write_columns(reports_path(out_dir), {"slide_id": list(reports), "report": list(reports.values())})
    else:  # an earlier run's table would pass for this run's
        reports_path(out_dir).unlink(missing_ok=True)
