"""Compare finished training runs (e.g. one per tile encoder) on the slides they share.

Each run folder is what :func:`histoscope.train.train` writes: ``results.json`` names
the task (and classes), and ``fold_*/predictions.csv`` hold the out-of-fold
predictions, which pooled give one prediction per slide. Runs are compared on the
slides all of them predicted: each run's metrics with bootstrap CIs, and for every
pair of runs the paired bootstrap difference (the same resampled slides for both)
with its p-value (:func:`histoscope.eval.metrics.paired_bootstrap`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.eval.metrics import LOWER_IS_BETTER, paired_bootstrap
from histoscope.eval.report import evaluate
from histoscope.io.columns import read_columns
from histoscope.train.run import fold_dir, results_path
from histoscope.train.tasks import ClassificationTask, RegressionTask, SurvivalTask, Task

__all__ = ["compare_runs", "run_comparison_markdown"]


def _task(results: dict[str, Any], run: Path) -> Task:
    """The run's task, for :meth:`Task.metric_inputs` only (which no training option changes)."""
    kind = results.get("task")
    if kind == "classification":
        return ClassificationTask(results["class_names"], class_weighting=False)
    if kind == "regression":
        return RegressionTask()
    if kind == "survival":
        return SurvivalTask(loss="cox", bins=1)
    raise ValueError(f"{results_path(run, '.json')}: unknown task {kind!r}")


def _truth_columns(task: Task) -> tuple[str, ...]:
    return {"classification": ("target",), "regression": ("target",), "survival": ("time", "event")}[task.kind]


def _read_run(run: Path) -> tuple[dict[str, Any], Task, dict[str, list[str]]]:
    path = results_path(run, ".json")
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no results.json; is this a finished `histoscope train` output folder?")
    results = json.loads(path.read_text())
    pooled: dict[str, list[str]] = {}
    for fold in results["folds"]:
        columns = read_columns(fold_dir(run, fold["fold"]) / "predictions.csv")
        for name, values in columns.items():
            pooled.setdefault(name, []).extend(values)
    ids = pooled.get("slide_id", [])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{run}: a slide is predicted in more than one fold; out-of-fold predictions should "
                         "cover each slide once")
    return results, _task(results, run), pooled


def _names(runs: Sequence[Path]) -> list[str]:
    """Folder names; full paths where names repeat; a counter where even those do."""
    names = [run.name or str(run) for run in runs]
    if len(set(names)) < len(names) and len({str(run) for run in runs}) == len(runs):
        names = [str(run) for run in runs]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def compare_runs(runs: Sequence[str | Path], *, n_bootstrap: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """Metrics of every run and paired differences of every pair, on their common slides.

    Returns ``{"task", "n_slides", "runs": {name: {"path", "model", "n_own", "metrics"}},
    "pairs": [{"a", "b", "metrics": {metric: {"diff", "ci_low", "ci_high", "p_value"}}}]}``
    with ``metrics`` as :func:`histoscope.eval.report.evaluate` returns them.
    """
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError("comparing needs at least two run folders")
    loaded = [_read_run(run) for run in runs]
    kinds = {task.kind for _, task, _ in loaded}
    if len(kinds) > 1:
        raise ValueError(f"runs have different tasks ({', '.join(sorted(kinds))}); compare runs of one task")
    classes = {tuple(getattr(task, "class_names", ())) for _, task, _ in loaded}
    if len(classes) > 1:
        raise ValueError(f"runs have different classes {sorted(classes)}; compare runs on the same labels")
    common = set.intersection(*(set(columns["slide_id"]) for _, _, columns in loaded))
    if len(common) < 2:
        raise ValueError(f"the runs share {len(common)} slide(s); they must predict the same cohort")
    # the first run's pooled order: on a full overlap its numbers are exactly its own results.json
    order = [slide for slide in loaded[0][2]["slide_id"] if slide in common]
    task = loaded[0][1]
    inputs = []
    for run, (_, _, columns) in zip(runs, loaded):
        row = {slide: i for i, slide in enumerate(columns["slide_id"])}
        picked = {name: [values[row[s]] for s in order] for name, values in columns.items()}
        inputs.append(picked)
    for run, picked in zip(runs[1:], inputs[1:]):
        for name in _truth_columns(task):
            if picked[name] != inputs[0][name]:
                slide = next(s for s, a, b in zip(order, picked[name], inputs[0][name]) if a != b)
                raise ValueError(f"{run} and {runs[0]} disagree about slide {slide!r}'s {name}; were they trained "
                                 "on the same table?")
    names = _names(runs)
    document: dict[str, Any] = {"task": task.kind, "n_slides": len(order), "runs": {}, "pairs": [],
                                "bootstrap": {"n": n_bootstrap, "seed": seed, "level": level,
                                              "method": "percentile; paired over slides"}}
    metric_inputs = [task.metric_inputs(picked) for picked in inputs]
    for name, run, (results, _, columns), (metrics_fn, arrays, strata) in zip(names, runs, loaded, metric_inputs):
        document["runs"][name] = {"path": str(run), "model": results.get("model"), "n_own": len(columns["slide_id"]),
                                  "metrics": evaluate(metrics_fn, *arrays, strata=strata, n_bootstrap=n_bootstrap,
                                                      seed=seed, level=level)}
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        metrics_fn, arrays_a, strata = metric_inputs[i]
        _, arrays_b, _ = metric_inputs[j]
        document["pairs"].append({"a": a, "b": b, "metrics": paired_bootstrap(
            metrics_fn, arrays_a, arrays_b, n=n_bootstrap, seed=seed, strata=strata, level=level)})
    return document


def _cell(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or not np.isfinite(low):
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


def run_comparison_markdown(document: dict[str, Any], *, title: str = "Slide-level comparison") -> str:
    """The runs side by side, then every pair's paired differences with p-values."""
    names = list(document["runs"])
    metrics = list(next(iter(document["runs"].values()))["metrics"])
    level = int(round(document["bootstrap"]["level"] * 100))
    lines = [f"# {title}", "", f"Task: {document['task']}. {document['n_slides']} slides predicted by every run "
             f"(pooled out-of-fold). Values with bootstrap {level}% CIs ({document['bootstrap']['n']} resamples); "
             "differences paired over the same resampled slides, two-sided bootstrap p-values.", "",
             "| run | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name in names:
        run = document["runs"][name]
        cells = " | ".join(_cell(run["metrics"][m]["value"], run["metrics"][m]["ci_low"], run["metrics"][m]["ci_high"])
                           for m in metrics)
        lines.append(f"| {name} | {run['model']} | {cells} |")
    lines += ["", "| a − b | " + " | ".join(f"{m} diff (CI), p" for m in metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for pair in document["pairs"]:
        cells = []
        for m in metrics:
            d = pair["metrics"][m]
            better = "" if not np.isfinite(d["diff"]) or d["diff"] == 0 else (
                pair["a"] if (d["diff"] > 0) != (m in LOWER_IS_BETTER) else pair["b"])
            p = "n/a" if d["p_value"] is None or not np.isfinite(d["p_value"]) else f"{d['p_value']:.3g}"
            cells.append(f"{_cell(d['diff'], d['ci_low'], d['ci_high'])}, p = {p}" + (f" ({better})" if better else ""))
        lines.append(f"| {pair['a']} − {pair['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
