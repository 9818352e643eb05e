"""What differs between classification, regression and survival: targets, loss, outputs, metrics.

A task is fitted on a fold's training slides (class weights, target scaling, time
bins) and describes itself as plain data (:meth:`Task.meta`) that goes into the
checkpoint, so ``histoscope predict`` rebuilds the same output mapping with
:func:`task_from_meta`.

Notation: B slides, C model outputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from histoscope.eval.metrics import classification_metrics, regression_metrics, survival_metrics
from histoscope.train.data import Sample
from histoscope.train.losses import cox_loss, discrete_risk, discrete_time_nll, time_bin_index, time_bins

__all__ = ["Task", "ClassificationTask", "RegressionTask", "SurvivalTask", "make_task", "task_from_meta"]


class Task:
    kind: str
    num_outputs: int
    calibrates = False  # True: call calibrate() with the training slides' logits after training

    def strata(self, samples: list[Sample]) -> np.ndarray:
        """What cross-validation stratifies on."""
        raise NotImplementedError

    def fit(self, samples: list[Sample]) -> None:
        """Learn what the loss needs from the training slides."""

    def calibrate(self, logits: np.ndarray) -> None:
        """Learn output post-processing from the trained model's (n, C) logits on its training slides."""

    def targets(self, samples: list[Sample]) -> Tensor:
        raise NotImplementedError

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_weights(self, samples: list[Sample]) -> np.ndarray | None:
        """Per-slide sampling weights for balanced sampling (``None``: not applicable)."""
        return None

    def truth_columns(self, samples: list[Sample]) -> dict[str, list]:
        raise NotImplementedError

    def output_columns(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Prediction columns from (n, C) logits."""
        raise NotImplementedError

    def metric_inputs(self, columns: dict[str, np.ndarray]) -> tuple[Any, tuple, np.ndarray | None]:
        """``(metrics_fn, arrays, bootstrap strata)`` from prediction + truth columns."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"task": self.kind}


def _sort_labels(labels) -> list[str]:
    labels = sorted(set(labels))
    try:
        return sorted(labels, key=float)  # grades 0, 1, 2, 10 in numeric order (QWK needs it)
    except ValueError:
        return labels


class ClassificationTask(Task):
    kind = "classification"

    def __init__(self, class_names: list[str], *, class_weighting: bool = False):
        self.class_names = list(class_names)
        self.index = {name: i for i, name in enumerate(self.class_names)}
        self.num_outputs = len(self.class_names)
        self.class_weighting = class_weighting
        self.weights: Tensor | None = None

    def strata(self, samples):
        return np.array([s.label for s in samples])

    def fit(self, samples):
        if self.class_weighting:
            counts = Counter(self.index[s.label] for s in samples)
            self.weights = torch.tensor([len(samples) / (self.num_outputs * counts[c]) if counts[c] else 0.0
                                         for c in range(self.num_outputs)], dtype=torch.float32)

    def targets(self, samples):
        return torch.tensor([self.index[s.label] for s in samples], dtype=torch.long)

    def loss(self, logits, targets):
        weight = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits.float(), targets, weight=weight)

    def sample_weights(self, samples):
        counts = Counter(s.label for s in samples)
        return np.array([1.0 / counts[s.label] for s in samples])

    def truth_columns(self, samples):
        return {"label": [s.label for s in samples], "target": [self.index[s.label] for s in samples]}

    def output_columns(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        columns = {"pred_label": np.array(self.class_names, dtype=object)[probs.argmax(1)]}
        columns.update({f"prob_{name}": probs[:, i] for i, name in enumerate(self.class_names)})
        return columns

    def metric_inputs(self, columns):
        target = np.asarray(columns["target"], dtype=np.int64)
        probs = np.stack([np.asarray(columns[f"prob_{n}"], dtype=np.float64) for n in self.class_names], axis=1)
        return classification_metrics, (target, probs), target

    def meta(self):
        return {"task": self.kind, "label_map": dict(self.index)}


class RegressionTask(Task):
    kind = "regression"
    num_outputs = 1

    def __init__(self, *, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def strata(self, samples):
        values = np.array([float(s.label) for s in samples])
        edges = np.quantile(values, [0.25, 0.5, 0.75])
        return np.searchsorted(edges, values, side="right")

    def fit(self, samples):
        values = np.array([float(s.label) for s in samples])
        self.mean = float(values.mean())
        self.std = float(values.std()) or 1.0

    def targets(self, samples):
        return torch.tensor([(float(s.label) - self.mean) / self.std for s in samples], dtype=torch.float32)

    def loss(self, logits, targets):
        return F.mse_loss(logits.float().reshape(-1), targets)

    def truth_columns(self, samples):
        return {"target": [float(s.label) for s in samples]}

    def output_columns(self, logits):
        return {"pred": np.asarray(logits, dtype=np.float64)[:, 0] * self.std + self.mean}

    def metric_inputs(self, columns):
        return regression_metrics, (np.asarray(columns["target"], float), np.asarray(columns["pred"], float)), None

    def meta(self):
        return {"task": self.kind, "target_mean": self.mean, "target_std": self.std}


class SurvivalTask(Task):
    kind = "survival"
    calibrates = True

    def __init__(self, *, loss: str = "cox", bins: int = 4, cuts: list[float] | None = None,
                 risk_center: float = 0.0, risk_scale: float = 1.0):
        self.loss_name = loss
        self.bins = bins
        self.cuts = np.asarray(cuts if cuts is not None else [], dtype=np.float64)
        self.num_outputs = 1 if loss == "cox" else bins
        self.risk_center, self.risk_scale = risk_center, risk_scale

    def strata(self, samples):
        return np.array([s.event for s in samples])

    def fit(self, samples):
        if self.loss_name == "discrete":
            self.cuts = time_bins(np.array([s.time for s in samples if s.event]), self.bins)

    def targets(self, samples):
        time = np.array([s.time for s in samples], dtype=np.float64)
        bin_index = time_bin_index(time, self.cuts) if self.loss_name == "discrete" else np.zeros(len(time))
        return torch.tensor(np.stack([time, [s.event for s in samples], bin_index], axis=1), dtype=torch.float32)

    def loss(self, logits, targets):
        if self.loss_name == "cox":
            return cox_loss(logits[:, 0], targets[:, 0], targets[:, 1])
        return discrete_time_nll(logits, targets[:, 2], targets[:, 1])

    def sample_weights(self, samples):
        counts = Counter(s.event for s in samples)
        return np.array([1.0 / counts[s.event] for s in samples])

    def truth_columns(self, samples):
        return {"time": [s.time for s in samples], "event": [s.event for s in samples]}

    def _raw_risk(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0] if self.loss_name == "cox" else discrete_risk(logits)

    def calibrate(self, logits):
        # A Cox model's risks are only defined up to a shift, and each fold's model picks
        # its own; centring on the training slides' median (in units of their spread) puts
        # every fold on one scale, so pooled out-of-fold risks can be ranked together and
        # risk > 0 reads as "higher than the median training patient".
        raw = self._raw_risk(np.asarray(logits, dtype=np.float64))
        self.risk_center = float(np.median(raw))
        self.risk_scale = float(raw.std()) or 1.0

    def output_columns(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        columns = {"risk": (self._raw_risk(logits) - self.risk_center) / self.risk_scale}
        if self.loss_name == "discrete":
            survival = np.cumprod(1 / (1 + np.exp(logits)), axis=1)  # Π (1 - sigmoid(logit))
            columns.update({f"survival_bin{k}": survival[:, k] for k in range(self.bins)})
        return columns

    def metric_inputs(self, columns):
        event = np.asarray(columns["event"], dtype=np.int64)
        return survival_metrics, (np.asarray(columns["time"], float), event, np.asarray(columns["risk"], float)), event

    def meta(self):
        return {"task": self.kind, "survival_loss": self.loss_name, "time_bins": [float(c) for c in self.cuts],
                "num_bins": self.bins, "risk_center": self.risk_center, "risk_scale": self.risk_scale}


def make_task(config, samples: list[Sample]) -> Task:
    """The task a recipe asks for; classes come from the whole table so every fold shares them."""
    if config.task == "classification":
        names = _sort_labels(s.label for s in samples)
        if len(names) < 2:
            raise ValueError(f"classification needs at least two classes; the table has {names}")
        return ClassificationTask(names, class_weighting=config.class_weighting)
    if config.task == "regression":
        return RegressionTask()
    return SurvivalTask(loss=config.survival.loss, bins=config.survival.bins)


def task_from_meta(meta: dict[str, Any]) -> Task:
    """The fitted task a checkpoint describes."""
    kind = meta.get("task")
    if kind == "classification":
        label_map = meta["label_map"]
        return ClassificationTask(sorted(label_map, key=label_map.get))
    if kind == "regression":
        return RegressionTask(mean=meta["target_mean"], std=meta["target_std"])
    if kind == "survival":
        return SurvivalTask(loss=meta["survival_loss"], bins=meta["num_bins"], cuts=meta["time_bins"],
                            risk_center=meta["risk_center"], risk_scale=meta["risk_scale"])
    raise ValueError(f"checkpoint names an unknown task {kind!r}")
