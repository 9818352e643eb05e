"""Evaluation: metrics with bootstrap CIs, result tables and plots, and UNI's frozen-feature
protocols (linear probe, kNN, SimpleShot, few-shot episodes, ROI retrieval).

The protocols need torch (and retrieval faiss); they are imported on first use, so
reading metrics and reports stays light.
"""

from importlib import import_module

from histoscope.eval.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    bootstrap_cis,
    bootstrap_samples,
    classification_metrics,
    concordance_index,
    confusion_matrices,
    confusion_scores,
    kaplan_meier,
    logrank_test,
    macro_auroc,
    ovo_auroc,
    paired_bootstrap,
    probe_metrics,
    quadratic_weighted_kappa,
    regression_metrics,
    roc_auc,
    survival_metrics,
    weighted_f1,
)
from histoscope.eval.report import evaluate, results_markdown, summarise

_LAZY = {
    "ProbeResult": "probes", "linear_probe": "probes", "knn_probe": "probes", "simpleshot": "probes",
    "FewShotResult": "episodes", "fewshot": "episodes", "sample_episodes": "episodes",
    "RetrievalResult": "roi_retrieval", "retrieval": "roi_retrieval",
    "TileEvalSettings": "tiles", "evaluate_tiles": "tiles", "write_tile_report": "tiles",
}

__all__ = [
    "balanced_accuracy", "bootstrap_ci", "bootstrap_cis", "bootstrap_samples", "classification_metrics",
    "concordance_index", "confusion_matrices", "confusion_scores", "evaluate", "kaplan_meier", "logrank_test",
    "macro_auroc", "ovo_auroc", "paired_bootstrap", "probe_metrics", "quadratic_weighted_kappa",
    "regression_metrics", "results_markdown", "roc_auc", "summarise", "survival_metrics", "weighted_f1", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"histoscope.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'histoscope.eval' has no attribute {name!r}")
