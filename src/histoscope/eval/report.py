"""Per-fold and pooled metric tables with bootstrap CIs, as JSON-able dicts and Markdown."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from histoscope.eval.metrics import bootstrap_cis

__all__ = ["evaluate", "summarise", "results_markdown"]


def evaluate(metrics: Callable[..., dict[str, float]], *arrays, strata=None, n_bootstrap: int = 1000,
             seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for ``metrics(*arrays)``."""
    values = metrics(*arrays)
    intervals = (bootstrap_cis(metrics, *arrays, n=n_bootstrap, seed=seed, strata=strata, level=level)
                 if n_bootstrap > 0 else {})
    nan = float("nan")
    return {name: {"value": value, "ci_low": intervals.get(name, (nan, nan))[0],
                   "ci_high": intervals.get(name, (nan, nan))[1]} for name, value in values.items()}


def summarise(*, task: str, folds: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any],
              bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    """Results document: each fold's metrics, their mean ± std over folds, and pooled metrics.

    ``folds`` items are ``{"fold", "n", "metrics"}`` and ``pooled`` is ``{"n", "metrics"}``,
    with ``metrics`` as :func:`evaluate` returns them.
    """
    names = list(pooled["metrics"])
    fold_mean = {}
    for name in names:
        values = np.array([f["metrics"][name]["value"] for f in folds], dtype=np.float64)
        values = values[np.isfinite(values)]
        fold_mean[name] = {"mean": float(values.mean()) if len(values) else float("nan"),
                           "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan")}
    return {"task": task, "bootstrap": dict(bootstrap), "pooled": dict(pooled), "folds": list(folds),
            "fold_mean": fold_mean}


def _cell(entry: Mapping[str, float]) -> str:
    value, low, high = entry["value"], entry["ci_low"], entry["ci_high"]
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} ({low:.3f}–{high:.3f})" if np.isfinite(low) else f"{value:.3f}"


def _mean_cell(entry: Mapping[str, float]) -> str:
    mean, std = entry["mean"], entry["std"]
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"


def results_markdown(results: Mapping[str, Any], *, title: str = "Results") -> str:
    names = list(results["pooled"]["metrics"])
    level = int(round(results["bootstrap"].get("level", 0.95) * 100))
    lines = [f"# {title}", "", f"Task: {results['task']}. Values with bootstrap {level}% CIs "
             f"({results['bootstrap'].get('n', 0)} resamples).", "",
             "| split | n | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
    for fold in results["folds"]:
        cells = " | ".join(_cell(fold["metrics"][name]) for name in names)
        lines.append(f"| fold {fold['fold']} | {fold['n']} | {cells} |")
    mean = " | ".join(_mean_cell(results["fold_mean"][n]) for n in names)
    lines.append(f"| mean ± std over folds | | {mean} |")
    pooled = " | ".join(_cell(results["pooled"]["metrics"][name]) for name in names)
    lines.append(f"| **pooled** | {results['pooled']['n']} | {pooled} |")
    if results.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {warning}" for warning in results["warnings"]]
    return "\n".join(lines) + "\n"
