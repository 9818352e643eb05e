"""What differs between classification, regression and survival: targets, loss, outputs, metrics.

A task is fitted on a fold's training slides (class weights, target scaling, time
bins). What its model's outputs mean is its :attr:`Task.outputs`
(:mod:`histoscope.slide.outputs`), which goes into the checkpoint as plain data, so
``histoscope predict`` writes the same prediction columns without the trainer.

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
from histoscope.slide.outputs import ClassOutputs, Outputs, RegressionOutputs, SurvivalOutputs
from histoscope.train.data import Sample
from histoscope.train.losses import cox_loss, discrete_time_nll, time_bin_index, time_bins

__all__ = ["Task", "ClassificationTask", "RegressionTask", "SurvivalTask", "make_task"]


class Task:
    kind: str
    outputs: Outputs  # what the model's C outputs mean (the prediction columns)
    calibrates = False  # True: call calibrate() with the training slides' logits after training

    @property
    def num_outputs(self) -> int:
        return self.outputs.num_outputs

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
        return self.outputs.columns(logits)

    def metric_inputs(self, columns: dict[str, np.ndarray]) -> tuple[Any, tuple, np.ndarray | None]:
        """``(metrics_fn, arrays, bootstrap strata)`` from prediction + truth columns."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return self.outputs.meta()

    def undefined_metrics(self, samples: list[Sample]) -> list[str]:
        """The metrics no model output can define on ``samples`` (AUROC over one class, a
        c-index without comparable pairs, R² of one value): probed with seeded random outputs."""
        logits = np.random.default_rng(0).normal(size=(len(samples), self.num_outputs))
        metrics, arrays, _ = self.metric_inputs({**self.truth_columns(samples), **self.output_columns(logits)})
        return [name for name, value in metrics(*arrays).items() if not np.isfinite(value)]


def _sort_labels(labels) -> list[str]:
    labels = sorted(set(labels))
    try:
        return sorted(labels, key=float)  # grades 0, 1, 2, 10 in numeric order (QWK needs it)
    except ValueError:
        return labels


class ClassificationTask(Task):
    kind = "classification"

    def __init__(self, class_names: list[str], *, class_weighting: bool):
        self.outputs = ClassOutputs(class_names)
        self.class_names = self.outputs.class_names
        self.index = self.outputs.index
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

    def metric_inputs(self, columns):
        target = np.asarray(columns["target"], dtype=np.int64)
        probs = np.stack([np.asarray(columns[f"prob_{n}"], dtype=np.float64) for n in self.class_names], axis=1)
        return classification_metrics, (target, probs), target


class RegressionTask(Task):
    kind = "regression"

    def __init__(self):
        self.outputs = RegressionOutputs()

    def strata(self, samples):
        values = np.array([float(s.label) for s in samples])
        edges = np.quantile(values, [0.25, 0.5, 0.75])
        return np.searchsorted(edges, values, side="right")

    def fit(self, samples):
        values = np.array([float(s.label) for s in samples])
        self.outputs.mean = float(values.mean())
        self.outputs.std = float(values.std()) or 1.0

    def targets(self, samples):
        mean, std = self.outputs.mean, self.outputs.std
        return torch.tensor([(float(s.label) - mean) / std for s in samples], dtype=torch.float32)

    def loss(self, logits, targets):
        return F.mse_loss(logits.float().reshape(-1), targets)

    def truth_columns(self, samples):
        return {"target": [float(s.label) for s in samples]}

    def metric_inputs(self, columns):
        return regression_metrics, (np.asarray(columns["target"], float), np.asarray(columns["pred"], float)), None


class SurvivalTask(Task):
    kind = "survival"
    calibrates = True

    def __init__(self, *, loss: str, bins: int):
        self.outputs = SurvivalOutputs(loss=loss, bins=bins)

    def strata(self, samples):
        return np.array([s.event for s in samples])

    def fit(self, samples):
        if self.outputs.loss == "discrete":
            self.outputs.cuts = time_bins(np.array([s.time for s in samples if s.event]), self.outputs.bins)

    def targets(self, samples):
        time = np.array([s.time for s in samples], dtype=np.float64)
        discrete = self.outputs.loss == "discrete"
        bin_index = time_bin_index(time, self.outputs.cuts) if discrete else np.zeros(len(time))
        return torch.tensor(np.stack([time, [s.event for s in samples], bin_index], axis=1), dtype=torch.float32)

    def loss(self, logits, targets):
        if self.outputs.loss == "cox":
            return cox_loss(logits[:, 0], targets[:, 0], targets[:, 1])
        return discrete_time_nll(logits, targets[:, 2], targets[:, 1])

    def sample_weights(self, samples):
        counts = Counter(s.event for s in samples)
        return np.array([1.0 / counts[s.event] for s in samples])

    def truth_columns(self, samples):
        return {"time": [s.time for s in samples], "event": [s.event for s in samples]}

    def calibrate(self, logits):
        # A Cox model's risks are only defined up to a shift, and each fold's model picks
        # its own; centring on the training slides' median (in units of their spread) puts
        # every fold on one scale, so pooled out-of-fold risks can be ranked together and
        # risk > 0 reads as "higher than the median training patient".
        raw = self.outputs.raw_risk(logits)
        self.outputs.risk_center = float(np.median(raw))
        self.outputs.risk_scale = float(raw.std()) or 1.0

    def metric_inputs(self, columns):
        event = np.asarray(columns["event"], dtype=np.int64)
        return survival_metrics, (np.asarray(columns["time"], float), event, np.asarray(columns["risk"], float)), event


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
