"""Evaluation: slide-level metrics with bootstrap CIs, result tables and plots."""

from histoscope.eval.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    bootstrap_cis,
    classification_metrics,
    concordance_index,
    kaplan_meier,
    logrank_test,
    macro_auroc,
    quadratic_weighted_kappa,
    regression_metrics,
    roc_auc,
    survival_metrics,
    weighted_f1,
)
from histoscope.eval.report import evaluate, results_markdown, summarise

__all__ = [
    "balanced_accuracy", "bootstrap_ci", "bootstrap_cis", "classification_metrics", "concordance_index",
    "evaluate", "kaplan_meier", "logrank_test", "macro_auroc", "quadratic_weighted_kappa", "regression_metrics",
    "results_markdown", "roc_auc", "summarise", "survival_metrics", "weighted_f1",
]
