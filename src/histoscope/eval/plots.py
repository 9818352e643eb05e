"""ROC, Kaplan–Meier, regression, confusion-matrix and few-shot plots as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here
opens a window or changes the process-wide backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from histoscope.eval.metrics import concordance_index, kaplan_meier, logrank_test, roc_auc

__all__ = ["roc_points", "plot_roc", "plot_kaplan_meier", "plot_regression", "plot_confusion",
           "plot_fewshot_curves"]


def roc_points(positive, score) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` at every distinct threshold."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    positive, score = positive[order], score[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score) != 0), len(score) - 1]
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(~positive)[last_of_tie]
    tpr = np.r_[0, tp / max(1, positive.sum())]
    fpr = np.r_[0, fp / max(1, (~positive).sum())]
    return fpr, tpr


def _figure(size=(5, 5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    from histoscope.io.atomic import atomic_path

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def plot_roc(y_true, probs, class_names: Sequence[str], path: str | Path, *, title: str = "ROC") -> Path:
    """One-vs-rest ROC curve per class (only the positive class for two classes)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    figure = _figure()
    axes = figure.add_subplot()
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for c in classes:
        positive = y_true == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_points(positive, probs[:, c])
        axes.plot(fpr, tpr, drawstyle="steps-post",
                  label=f"{class_names[c]} (AUC {roc_auc(positive, probs[:, c]):.3f})")
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    axes.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_kaplan_meier(time, event, risk, path: str | Path, *, title: str = "Kaplan–Meier") -> Path:
    """Survival of the high- and low-risk halves, split at the median predicted risk."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    high = risk > np.median(risk)
    _, p_value = logrank_test(time, event, high)
    figure = _figure((6, 4.5))
    axes = figure.add_subplot()
    for name, members, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if members.any():
            times, survival = kaplan_meier(time[members], event[members])
            times = np.r_[times, time[members].max()]
            survival = np.r_[survival, survival[-1]]
            axes.step(times, survival, where="post", color=color, label=f"{name} (n={int(members.sum())})")
            censored = members & ~event
            at = np.searchsorted(times, time[censored], side="right") - 1
            axes.plot(time[censored], survival[at], "|", color=color, markersize=8)
    c_index = concordance_index(time, event, risk)
    axes.set(xlabel="Time", ylabel="Survival probability", ylim=(0, 1.02),
             title=f"{title}\nC-index {c_index:.3f}, log-rank p = {p_value:.2g}")
    axes.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def plot_regression(y_true, y_pred, path: str | Path, *, title: str = "Predicted vs true") -> Path:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    figure = _figure()
    axes = figure.add_subplot()
    axes.scatter(y_true, y_pred, s=12, alpha=0.7)
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    axes.plot([low, high], [low, high], color="0.7", linestyle="--", linewidth=1)
    axes.set(xlabel="True", ylabel="Predicted", title=title)
    return _save(figure, path)


def plot_confusion(confusion, class_names: Sequence[str], path: str | Path, *, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (true class per row) annotated with the counts."""
    confusion = np.asarray(confusion, dtype=np.int64)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure = _figure((size, size))
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(confusion):
        axes.text(j, i, str(count), ha="center", va="center", fontsize=8,
                  color="white" if rates[i, j] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, labels=list(class_names), fontsize=8)
    axes.set(xlabel="Predicted", ylabel="True", title=title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(figure, path)


def plot_fewshot_curves(curves: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: str | Path, *,
                        metric: str = "bacc", title: str = "Few-shot (SimpleShot episodes)") -> Path:
    """``metric`` (mean ± std over episodes) against shots per class, one line per encoder.

    ``curves``: encoder -> {shots (str or int): {metric: {"mean", "std"}}}.
    """
    figure = _figure((6, 4.5))
    axes = figure.add_subplot()
    ticks: set[int] = set()
    for name, by_shots in curves.items():
        shots = sorted(by_shots, key=int)
        x = np.array([int(s) for s in shots])
        mean = np.array([by_shots[s][metric]["mean"] for s in shots], dtype=np.float64)
        std = np.nan_to_num(np.array([by_shots[s][metric]["std"] for s in shots], dtype=np.float64))
        axes.plot(x, mean, marker="o", label=name)
        axes.fill_between(x, mean - std, mean + std, alpha=0.2)
        ticks.update(x.tolist())
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(ticks), labels=[str(t) for t in sorted(ticks)])
    axes.minorticks_off()
    axes.set(xlabel="shots per class", ylabel=metric, title=title)
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)
