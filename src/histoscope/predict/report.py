"""``histoscope report``: pathology reports written by a report model from slides' tile features.

Output folder::

    OUT/reports.csv     slide_id, report (one row per slide that succeeded)
    OUT/reports.json    the same with the model, prompt and decoding settings, and the failed slides
    OUT/<slide>.txt     each report on its own
    OUT/<slide>/words/NN_<word>.csv, .geojson   with ``heatmaps``: each word's attention over the tiles

Inputs are features files (``<slide>.h5``), folders of them, or CSV files with a
``features`` (or ``path``) column and an optional ``slide_id`` column. A features file
that is missing, unreadable, empty or of the wrong dim fails its slide only; the
others are written.

Notation: B slides per batch, N tiles, D feature dim, T tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.io.atomic import atomic_path, write_json
from histoscope.io.columns import csv_reader, write_columns
from histoscope.io.features_h5 import FeaturesError, check_finite, read_features
from histoscope.io.outdir import output_folder
from histoscope.language.generation import left_pad
from histoscope.language.report_attention import token_tile_attention, word_spans
from histoscope.language.report_text import decode_report, prompt_ids
from histoscope.language.trained_report import ReportRun, load_report_run
from histoscope.predict.heatmap import tiles_geojson, write_tile_scores
from histoscope.slide.bags import collate_bags
from histoscope.tiling.geometry import TileGeometry
from histoscope.utils.device import autocast, resolve_device, resolve_dtype

_DEFAULT_NEW_TOKENS = 256

__all__ = ["DecodeSettings", "ReportResult", "collect_features", "generate_batch", "reports_path",
           "write_reports", "write_word_heatmaps"]


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
    reports: dict[str, str]  # slide_id → report
    failed: dict[str, str]  # slide_id → error


def collect_features(specs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(slide_id, features file)`` for files, folders of ``*.h5`` and CSV tables."""
    found: list[tuple[str, Path]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.h5"))
            if not files:
                raise FileNotFoundError(f"{path}: no features files (*.h5) in this folder; pass the folder "
                                        "histoscope embed wrote (OUT/features_<encoder>)")
            found += [(f.stem, f) for f in files]
        elif path.suffix.lower() == ".csv":
            found += _from_csv(path)
        else:
            found.append((path.stem, path))  # a missing file fails its slide, not the run
    seen: dict[str, Path] = {}
    for slide_id, path in found:
        if seen.setdefault(slide_id, path) != path:
            raise ValueError(f"slide id {slide_id!r} names two features files ({seen[slide_id]} and {path}); "
                             "give each slide one file, or slide_id values in a CSV")
    return list(seen.items())


def _from_csv(path: Path) -> list[tuple[str, Path]]:
    reader = csv_reader(path)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    column = next((c for c in ("features", "path") if c in columns), None)
    if column is None:
        raise ValueError(f"{path}: a features CSV needs a 'features' (or 'path') column of .h5 files; has {columns}")
    rows = []
    for row in reader:
        file = Path((row[column] or "").strip())
        if not file.is_absolute():
            file = path.parent / file
        rows.append(((row.get("slide_id") or "").strip() or file.stem, file))
    return rows


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


def write_reports(features: Sequence[str | Path], *, model: str | Path, out_dir: str | Path,
                  tokenizer: str | Path | None = None, prompt: str | None = None,
                  settings: DecodeSettings = DecodeSettings(), batch_size: int = 8, device: str = "auto",
                  precision: str = "fp32", heatmaps: bool = False,
                  log: Callable[[str], None] | None = None) -> ReportResult:
    """Write a report for every slide; one that fails is recorded and the others finish.

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
    """
    log = log or (lambda message: None)
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = collect_features(features)
    if not jobs:
        raise FileNotFoundError("no features files given; pass .h5 files, folders of them or a CSV")
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    run = load_report_run(model, tokenizer=tokenizer, device=torch_device)
    prompt = run.prompt if prompt is None else prompt
    reports: dict[str, str] = {}
    failed: dict[str, str] = {}
    with output_folder(out_dir):
        for start in range(0, len(jobs), batch_size):
            batch: list[tuple[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]] = []
            for slide_id, path in jobs[start:start + batch_size]:
                try:
                    batch.append((slide_id, _read_slide(path, run.model.dim_feats)))
                except (OSError, ValueError) as error:
                    failed[slide_id] = str(error)
                    log(f"FAILED {slide_id}: {error}")
            if not batch:
                continue
            generated = generate_batch(run, [slide[0] for _, slide in batch], prompt=prompt, settings=settings,
                                       device=torch_device, dtype=dtype)
            for (slide_id, slide), ids in zip(batch, generated):
                text = decode_report(run.tokenizer, ids)
                reports[slide_id] = text
                if heatmaps:
                    write_word_heatmaps(out_dir / slide_id / "words", run, prompt_ids(run.tokenizer, prompt),
                                        _end_at_eos(run.tokenizer, ids), *slide, device=torch_device)
                with atomic_path(out_dir / f"{slide_id}.txt") as tmp:
                    tmp.write_text(text + "\n")
            log(f"{len(reports)} of {len(jobs)} reports written")
        _write_tables(out_dir, reports, failed, model=model, prompt=prompt, settings=settings, meta=run.meta)
    return ReportResult(reports, failed)


def _write_tables(out_dir: Path, reports: dict[str, str], failed: dict[str, str], *, model, prompt: str,
                  settings: DecodeSettings, meta: dict[str, Any]) -> None:
    write_json(reports_path(out_dir, ".json"), {
        "model": str(model), "architecture": meta.get("histoscope_model"), "prompt": prompt,
        "decoding": asdict(settings), "reports": [{"slide_id": k, "report": v} for k, v in reports.items()],
        "failed": failed})
    if reports:
        write_columns(reports_path(out_dir), {"slide_id": list(reports), "report": list(reports.values())})
    else:  # an earlier run's table would pass for this run's
        reports_path(out_dir).unlink(missing_ok=True)
