"""Metrics for classification, regression and survival, with bootstrap CIs.

Notation: n samples, C classes, E a leading batch of evaluations (few-shot episodes).
``probs`` (n, C) are class probabilities, ``risk`` (n,) is higher for shorter expected
survival, a confusion matrix ``[i, j]`` counts samples of true class i predicted as j.
Every metric returns ``nan`` where it is undefined (one class only, no comparable
pair) instead of raising, so a bootstrap resample that happens to miss a class is
skipped rather than fatal.

Accuracy-type scores come from confusion matrices (:func:`confusion_scores`), which
work on a whole batch of episodes at once; :func:`probe_metrics` is the set UNI
reports for frozen-feature protocols, defined as its ``get_eval_metrics`` computes
them with scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "balanced_accuracy", "roc_auc", "macro_auroc", "ovo_auroc", "weighted_f1", "quadratic_weighted_kappa",
    "confusion_matrices", "confusion_scores", "probe_metrics",
    "concordance_index", "kaplan_meier", "logrank_test", "bootstrap_samples", "bootstrap_ci", "bootstrap_cis",
    "paired_bootstrap", "classification_metrics", "regression_metrics", "survival_metrics", "LOWER_IS_BETTER",
]

LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae"})


def confusion_matrices(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``[..., i, j]`` of true class i predicted as j.

    ``y_true``, ``y_pred`` are class indices 0 … C-1 of shape (..., n) (one row per
    episode, or a single (n,) vector); returns (..., C, C) int64.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    for values in (y_true, y_pred):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"class indices must lie in 0 … {num_classes - 1}, got {values.min()} … {values.max()}")
    batch = y_true.shape[:-1]
    rows = int(np.prod(batch))
    flat = (np.arange(rows)[:, None] * num_classes + y_true.reshape(rows, -1)) * num_classes + y_pred.reshape(rows, -1)
    counts = np.bincount(flat.ravel(), minlength=rows * num_classes * num_classes)
    return counts.reshape(*batch, num_classes, num_classes)


def _quadratic_kappa(confusion: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Cohen's kappa with weights (grade_i - grade_j)² of (..., C, C) confusion matrices."""
    confusion = confusion.astype(np.float64)
    n = confusion.sum((-2, -1))
    expected = confusion.sum(-1)[..., :, None] * confusion.sum(-2)[..., None, :] / np.maximum(n, 1)[..., None, None]
    weights = (grades[..., :, None] - grades[..., None, :]) ** 2
    denominator = (weights * expected).sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 1 - (weights * confusion).sum((-2, -1)) / denominator, np.nan)


def confusion_scores(confusion) -> dict[str, np.ndarray]:
    """``acc``, ``bacc``, ``kappa`` and ``weighted_f1`` of (..., C, C) confusion matrices.

    Defined as scikit-learn computes them on the labels seen (UNI's ``get_eval_metrics``):
    balanced accuracy is the mean recall over the classes present in ``y_true``;
    weighted F1 weights each class's F1 (0 where undefined) by its support; kappa is
    quadratic-weighted with distances between the *positions* of the classes among
    those occurring in ``y_true`` or ``y_pred`` (``cohen_kappa_score(weights="quadratic")``),
    so a class nobody has or predicts does not widen the distances.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    n = confusion.sum((-2, -1))
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    truth, predicted = confusion.sum(-1), confusion.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(truth > 0, hits / truth, np.nan)
        f1 = np.where(truth + predicted > 0, 2 * hits / (truth + predicted), 0.0)
        present = truth > 0
        bacc = np.where(present.any(-1), np.nansum(recall, -1) / present.sum(-1), np.nan)
        acc = np.where(n > 0, hits.sum(-1) / n, np.nan)
        weighted_f1 = np.where(n > 0, (truth * f1).sum(-1) / n, np.nan)
    observed = (truth + predicted) > 0
    positions = np.cumsum(observed, axis=-1) - 1.0
    return {"acc": acc, "bacc": bacc, "kappa": _quadratic_kappa(confusion, positions), "weighted_f1": weighted_f1}


def _label_confusion(y_true, y_pred) -> np.ndarray:
    """Confusion matrix over the labels (any hashable values) seen in either array."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels, index = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    return confusion_matrices(index[: len(y_true)], index[len(y_true):], max(len(labels), 1))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true``."""
    return float(confusion_scores(_label_confusion(y_true, y_pred))["bacc"])


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


def ovo_auroc(y_true, probs) -> float:
    """Hand & Till's one-vs-one AUROC, macro-averaged over class pairs.

    Each pair (a, b) of classes present in ``y_true`` scores the AUROC of a against b
    with column a and of b against a with column b, on the samples of those two
    classes, and contributes their mean (``roc_auc_score(multi_class="ovo")``).
    ``y_true`` holds class indices into the columns of ``probs`` (n, C).
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for a, b in combinations(np.unique(y_true), 2):
        pair = (y_true == a) | (y_true == b)
        scores.append((roc_auc(y_true[pair] == a, probs[pair, a]) + roc_auc(y_true[pair] == b, probs[pair, b])) / 2)
    return float(np.mean(scores)) if scores else float("nan")


def weighted_f1(y_true, y_pred) -> float:
    """Per-class F1 averaged with the classes' support in ``y_true`` as weights."""
    if len(y_true) == 0:
        return float("nan")
    return float(confusion_scores(_label_confusion(y_true, y_pred))["weighted_f1"])


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
    return float(_quadratic_kappa(confusion_matrices(y_true, y_pred, k), np.arange(k, dtype=np.float64)))


def probe_metrics(y_true, y_pred, probs=None) -> dict[str, float]:
    """UNI's metrics of a frozen-feature protocol: ``acc``, ``bacc``, ``kappa``, ``weighted_f1``
    (see :func:`confusion_scores`) and, given ``probs`` (n, C), ``auroc``.

    ``y_true``, ``y_pred`` are class indices 0 … C-1. AUROC is the positive class's
    (column 1) for two classes and Hand & Till's one-vs-one macro average otherwise
    (:func:`ovo_auroc`), as UNI's linear probe asks scikit-learn for it.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    num_classes = probs.shape[1] if probs is not None else int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    metrics = {name: float(v) for name, v in confusion_scores(confusion_matrices(y_true, y_pred, num_classes)).items()}
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        metrics["auroc"] = roc_auc(y_true == 1, probs[:, 1]) if probs.shape[1] == 2 else ovo_auroc(y_true, probs)
    return metrics


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


def bootstrap_samples(
    metrics: Callable[..., dict[str, float]],
    *arrays,
    n: int = 1000,
    seed: int = 0,
    strata=None,
) -> dict[str, np.ndarray]:
    """Every metric ``metrics(*arrays)`` returns, on ``n`` resamples: ``{name: (n,)}``.

    Resamples rows with replacement (within each stratum when ``strata`` is given, so
    every resample keeps the class or event balance); all arrays share each resample's
    rows, which makes a comparison of two predictors on the same samples paired.
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
    return {name: np.asarray(values, dtype=np.float64) for name, values in samples.items()}


def bootstrap_cis(
    metrics: Callable[..., dict[str, float]],
    *arrays,
    n: int = 1000,
    seed: int = 0,
    strata=None,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric ``metrics(*arrays)`` returns.

    See :func:`bootstrap_samples`. Resamples where a metric is undefined are dropped
    for that metric; fewer than half defined gives ``nan``.
    """
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, values in bootstrap_samples(metrics, *arrays, n=n, seed=seed, strata=strata).items():
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


def paired_bootstrap(
    metrics: Callable[..., dict[str, float]],
    arrays_a: tuple,
    arrays_b: tuple,
    *,
    n: int = 1000,
    seed: int = 0,
    strata=None,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap comparison of two predictors evaluated on the same samples.

    ``arrays_a`` and ``arrays_b`` are the arguments of ``metrics`` for predictor a and
    b, row i of each describing the same sample; every resample draws the same rows
    for both. Returns ``{metric: {"diff", "ci_low", "ci_high", "p_value"}}`` with
    ``diff`` = a − b on the full data, its percentile interval, and the two-sided
    p-value 2·min(P*(d ≤ 0), P*(d ≥ 0)) of the resampled differences d, counted
    with the observed-value correction (k + 1) / (n + 1) and capped at 1: the smallest
    level at which the percentile interval of the difference excludes 0.
    """
    k = len(arrays_a)
    if len(arrays_b) != k:
        raise ValueError("paired_bootstrap needs the same arguments for both predictors")

    def difference(*arrays) -> dict[str, float]:
        a, b = metrics(*arrays[:k]), metrics(*arrays[k:])
        return {name: a[name] - b[name] for name in a}

    observed = difference(*arrays_a, *arrays_b)
    samples = bootstrap_samples(difference, *arrays_a, *arrays_b, n=n, seed=seed, strata=strata)
    tail = (1 - level) / 2 * 100
    out = {}
    for name, diff in observed.items():
        values = samples[name][np.isfinite(samples[name])]
        if len(values) < n / 2 or not np.isfinite(diff):
            out[name] = {"diff": float(diff), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan")}
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        extreme = min(int((values <= 0).sum()), int((values >= 0).sum()))
        p_value = min(1.0, 2 * (extreme + 1) / (len(values) + 1))
        out[name] = {"diff": float(diff), "ci_low": float(low), "ci_high": float(high), "p_value": p_value}
    return out


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
