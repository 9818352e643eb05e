"""Metrics against scikit-learn, brute force and hand-computed values; reports and plots."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from histoscope.eval import (
    balanced_accuracy,
    bootstrap_ci,
    bootstrap_cis,
    classification_metrics,
    concordance_index,
    evaluate,
    kaplan_meier,
    logrank_test,
    macro_auroc,
    quadratic_weighted_kappa,
    regression_metrics,
    results_markdown,
    roc_auc,
    summarise,
    weighted_f1,
)
from histoscope.eval.plots import plot_kaplan_meier, plot_regression, plot_roc, roc_points


def _brute_force_c_index(time, event, risk):
    """Harrell's C by enumerating every ordered pair (the definition, O(n²))."""
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        if not event[i]:
            continue
        if time[i] < time[j] or (time[i] == time[j] and not event[j]):
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable if comparable else float("nan")


@pytest.mark.parametrize("seed", range(6))
def test_c_index_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    time = rng.integers(1, 12, size=n).astype(float)  # many tied times
    event = rng.uniform(size=n) < 0.6
    risk = rng.integers(0, 6, size=n).astype(float)  # many tied risks
    assert concordance_index(time, event, risk) == pytest.approx(_brute_force_c_index(time, event, risk), abs=1e-12)


def test_c_index_hand_values():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 1])
    assert concordance_index(time, event, [4, 3, 2, 1]) == 1.0  # higher risk dies sooner
    assert concordance_index(time, event, [1, 2, 3, 4]) == 0.0
    assert concordance_index(time, event, [1, 1, 1, 1]) == 0.5
    # event at t=2 tied with a censored slide at t=2: comparable (it was still at risk);
    # two events at the same time: not comparable.
    assert concordance_index([2.0, 2.0], [1, 0], [1.0, 0.0]) == 1.0
    assert np.isnan(concordance_index([2.0, 2.0], [1, 1], [1.0, 0.0]))
    assert np.isnan(concordance_index([1.0, 2.0], [0, 0], [1.0, 0.0]))


def test_binary_and_multiclass_auroc_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    score = np.round(y * 0.7 + rng.normal(size=200), 1)  # rounded: tied scores
    assert roc_auc(y == 1, score) == pytest.approx(roc_auc_score(y, score))
    assert macro_auroc(y, score) == pytest.approx(roc_auc_score(y, score))
    assert macro_auroc(y, np.stack([1 - score, score], 1)) == pytest.approx(roc_auc_score(y, score))
    y3 = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y3]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert macro_auroc(y3, probs) == pytest.approx(roc_auc_score(y3, probs, multi_class="ovr", average="macro"))
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_balanced_accuracy_weighted_f1_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=150)
    pred = np.where(rng.uniform(size=150) < 0.6, y, rng.integers(0, 4, size=150))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted"))
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5  # hand value: recalls 1 and 0


@pytest.mark.parametrize("seed", range(4))
def test_quadratic_weighted_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=120)
    pred = np.clip(y + rng.integers(-2, 3, size=120), 0, 4)
    expected = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5)))
    assert quadratic_weighted_kappa(y, pred, 5) == pytest.approx(expected)
    assert quadratic_weighted_kappa(y, y, 5) == pytest.approx(1.0)


def test_bootstrap_ci_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=100)
    score = y + rng.normal(size=100)
    first = bootstrap_ci(roc_auc, y == 1, score, n=300, seed=7)
    assert first == bootstrap_ci(roc_auc, y == 1, score, n=300, seed=7)
    assert first != bootstrap_ci(roc_auc, y == 1, score, n=300, seed=8)
    assert first[0] < roc_auc(y == 1, score) < first[1]
    wide = bootstrap_ci(roc_auc, y[:30] == 1, score[:30], n=300, seed=7)
    assert wide[1] - wide[0] > first[1] - first[0]
    # stratified: every resample keeps the class counts
    counts = []
    bootstrap_cis(lambda t: counts.append(int(t.sum())) or {"m": 0.0}, y, n=20, strata=y)
    assert set(counts) == {int(y.sum())}


def test_bootstrap_skips_undefined_resamples():
    y = np.array([1] + [0] * 39)
    low, high = bootstrap_ci(roc_auc, y == 1, np.arange(40.0), n=200, seed=0)  # often no positive
    assert np.isfinite(low) and np.isfinite(high)
    assert np.isnan(bootstrap_ci(roc_auc, np.zeros(10, bool), np.arange(10.0), n=50)).all()  # never defined


def test_kaplan_meier_and_logrank_hand_values():
    times, survival = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    # t=1: 4/5; t=2: one of 4 at risk dies → 3/5; t=3: one of 2 dies → 3/10
    assert times.tolist() == [0, 1, 2, 3]
    assert survival == pytest.approx([1, 0.8, 0.6, 0.3])
    rng = np.random.default_rng(3)
    group = np.arange(100) % 2 == 0
    time = np.where(group, rng.exponential(1, 100), rng.exponential(5, 100))
    _, p_far = logrank_test(time, np.ones(100), group)
    assert p_far < 1e-4
    _, p_same = logrank_test(np.r_[time, time], np.ones(200), np.r_[np.ones(100), np.zeros(100)] > 0)
    assert p_same == pytest.approx(1.0)


def test_task_metric_bundles():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    m = classification_metrics(y, probs)
    assert m["auroc"] == 0.75 and m["balanced_accuracy"] == 0.75  # negative 0.7 outranks positive 0.6
    r = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert r["rmse"] == pytest.approx(np.sqrt(1 / 3)) and r["mae"] == pytest.approx(1 / 3)
    assert r["r2"] == pytest.approx(1 - 1 / 2)


def test_report_json_and_markdown():
    rng = np.random.default_rng(4)
    folds = []
    for k in range(3):
        y = rng.integers(0, 2, size=30)
        probs = np.clip(y * 0.5 + rng.uniform(size=30) * 0.5, 0, 1)
        probs = np.stack([1 - probs, probs], 1)
        folds.append({"fold": str(k), "n": 30, "metrics": evaluate(classification_metrics, y, probs, strata=y,
                                                                   n_bootstrap=100)})
    pooled = {"n": 90, "metrics": folds[0]["metrics"]}
    results = summarise(task="classification", folds=folds, pooled=pooled, bootstrap={"n": 100, "level": 0.95})
    entry = results["folds"][0]["metrics"]["auroc"]
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    values = [f["metrics"]["auroc"]["value"] for f in folds]
    assert results["fold_mean"]["auroc"]["mean"] == pytest.approx(np.mean(values))
    text = results_markdown(results)
    assert "| fold 2 | 30 |" in text and "**pooled**" in text and "auroc" in text and "95%" in text


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, size=60)
    probs = rng.dirichlet(np.ones(3), size=60)
    time = rng.exponential(size=60)
    event = rng.uniform(size=60) < 0.7
    paths = [plot_roc(y, probs, ["a", "b", "c"], tmp_path / "roc.png"),
             plot_kaplan_meier(time, event, rng.normal(size=60), tmp_path / "km.png"),
             plot_regression(time, time + rng.normal(size=60), tmp_path / "reg.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    fpr, tpr = roc_points([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1])
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]
    assert not list(tmp_path.glob(".*partial*"))
