"""Slide-level metrics for classification, regression and survival, with bootstrap CIs.

Notation: n slides, C classes. ``probs`` (n, C) are class probabilities, ``risk`` (n,)
is higher for shorter expected survival. Every metric returns ``nan`` where it is
undefined (one class only, no comparable pair) instead of raising, so a bootstrap
resample that happens to miss a class is skipped rather than fatal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "balanced_accuracy", "roc_auc", "macro_auroc", "weighted_f1", "quadratic_weighted_kappa",
    "concordance_index", "kaplan_meier", "logrank_test", "bootstrap_ci", "bootstrap_cis",
    "classification_metrics", "regression_metrics", "survival_metrics", "LOWER_IS_BETTER",
]

LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae"})


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    if len(classes) == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def roc_auc(positive, score) -> float:
    """Binary AUROC as the Mann–Whitney statistic (tied scores count one half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(y_true, probs) -> float:
    """One-vs-rest AUROC averaged over classes; the plain AUROC of class 1 for C = 2.

    ``probs`` is (n, C), or (n,) holding the positive-class score of a binary task.
    Classes absent from ``y_true`` (or the only class present) are left out.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        return roc_auc(y_true == 1, probs)
    if probs.shape[1] == 2:
        return roc_auc(y_true == 1, probs[:, 1])
    values = [roc_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def weighted_f1(y_true, y_pred) -> float:
    """Per-class F1 averaged with the classes' support in ``y_true`` as weights."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    total = 0.0
    for c in np.unique(y_true):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        total += np.sum(y_true == c) * (2 * tp / (2 * tp + fp + fn))
    return float(total / len(y_true))


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Cohen's kappa with weights (i - j)² between ordinal classes 0 … K-1.

    Classes are the integer values themselves (not their positions among the values
    seen), so a grade nobody received still counts in the distances.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return float("nan")
    k = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    observed = np.zeros((k, k))
    np.add.at(observed, (y_true, y_pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(y_true)
    grades = np.arange(k)
    weights = (grades[:, None] - grades[None, :]) ** 2
    denominator = (weights * expected).sum()
    if denominator == 0:
        return float("nan")
    return float(1 - (weights * observed).sum() / denominator)


def concordance_index(time, event, risk) -> float:
    """Harrell's C: the fraction of comparable pairs whose risks are ordered like their times.

    A pair (i, j) is comparable when i has an event and ``t_i < t_j``, or ``t_i == t_j``
    and j is censored (it was still at risk when i died). Tied risks count one half;
    pairs of events at the same time are not comparable. O(n log n): walk the times
    from the latest down, keeping the risks of those still at risk in a Fenwick tree.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    ranks = rankdata(risk, method="dense").astype(np.int64)  # 1 … m
    tree = np.zeros(int(ranks.max(initial=0)) + 1, dtype=np.int64)

    def add(rank: int) -> None:
        while rank < len(tree):
            tree[rank] += 1
            rank += rank & -rank

    def count_upto(rank: int) -> int:  # how many inserted with rank <= rank
        total = 0
        while rank > 0:
            total += tree[rank]
            rank -= rank & -rank
        return int(total)

    order = np.argsort(-time, kind="stable")
    boundaries = np.flatnonzero(np.diff(time[order]) != 0) + 1
    concordant = tied = comparable = 0.0
    inserted = 0
    for group in np.split(order, boundaries):
        events = group[event[group]]
        for j in group[~event[group]]:  # censored at this time were still at risk
            add(ranks[j])
            inserted += 1
        for i in events:
            below = count_upto(ranks[i] - 1)
            concordant += below
            tied += count_upto(ranks[i]) - below
            comparable += inserted
        for i in events:
            add(ranks[i])
            inserted += 1
    if comparable == 0:
        return float("nan")
    return float((concordant + 0.5 * tied) / comparable)


def kaplan_meier(time, event) -> tuple[np.ndarray, np.ndarray]:
    """Step function ``(times (m+1,), survival (m+1,))`` starting at (0, 1)."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    times = np.unique(time[event])
    at_risk = np.array([(time >= t).sum() for t in times])
    deaths = np.array([(event & (time == t)).sum() for t in times])
    survival = np.cumprod(1 - deaths / np.maximum(at_risk, 1))
    return np.concatenate([[0.0], times]), np.concatenate([[1.0], survival])


def logrank_test(time, event, group) -> tuple[float, float]:
    """Two-group log-rank test: ``(chi², p-value)`` with one degree of freedom."""
    from scipy.stats import chi2

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    group = np.asarray(group).astype(bool)
    observed_minus_expected = variance = 0.0
    for t in np.unique(time[event]):
        at_risk = time >= t
        n, n1 = at_risk.sum(), (at_risk & group).sum()
        d = (event & (time == t)).sum()
        d1 = (event & (time == t) & group).sum()
        observed_minus_expected += d1 - d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if variance == 0:
        return float("nan"), float("nan")
    statistic = observed_minus_expected**2 / variance
    return float(statistic), float(chi2.sf(statistic, 1))


def bootstrap_cis(
    metrics: Callable[..., dict[str, float]],
    *arrays,
    n: int = 1000,
    seed: int = 0,
    strata=None,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric ``metrics(*arrays)`` returns.

    Resamples rows with replacement (within each stratum when ``strata`` is given, so
    every resample keeps the class or event balance). Resamples where a metric is
    undefined are dropped for that metric; fewer than half defined gives ``nan``.
    """
    arrays = [np.asarray(a) for a in arrays]
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    groups = [np.arange(size)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        for name, value in metrics(*[a[index] for a in arrays]).items():
            samples.setdefault(name, []).append(value)
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) < n / 2:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


def bootstrap_ci(metric: Callable[..., float], *arrays, n: int = 1000, seed: int = 0, strata=None,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of one scalar metric (see :func:`bootstrap_cis`)."""
    return bootstrap_cis(lambda *a: {"m": metric(*a)}, *arrays, n=n, seed=seed, strata=strata, level=level)["m"]


def classification_metrics(y_true, probs) -> dict[str, float]:
    """``y_true`` (n,) class indices, ``probs`` (n, C); predictions are the argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(1)
    return {
        "auroc": macro_auroc(y_true, probs),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "f1_weighted": weighted_f1(y_true, y_pred),
        "qwk": quadratic_weighted_kappa(y_true, y_pred, probs.shape[1]),
    }


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    residual = y_true - y_pred
    spread = ((y_true - y_true.mean()) ** 2).sum()
    pearson = np.corrcoef(y_true, y_pred)[0, 1] if len(y_true) > 1 and y_true.std() > 0 and y_pred.std() > 0 else np.nan
    return {
        "rmse": float(np.sqrt(np.mean(residual**2))),
        "mae": float(np.mean(np.abs(residual))),
        "r2": float(1 - (residual**2).sum() / spread) if spread > 0 else float("nan"),
        "pearson_r": float(pearson),
    }


def survival_metrics(time, event, risk) -> dict[str, float]:
    return {"c_index": concordance_index(time, event, risk)}
