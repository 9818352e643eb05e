"""What a trained slide model's C outputs mean: the prediction columns written for a slide.

Class probabilities and the predicted label, a regression value in the target's
units, or a survival risk on the training cohort's scale (with the survival curve of
a discrete-time model). The mapping is plain data (:meth:`Outputs.meta`), stored in
every trained checkpoint and rebuilt by :func:`outputs_from_meta`, so training and
inference write the same columns from the same logits.

Notation: n slides, C model outputs, K time bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Outputs", "ClassOutputs", "RegressionOutputs", "SurvivalOutputs", "outputs_from_meta", "discrete_risk"]


class Outputs:
    """Logits (n, C) → named prediction columns; ``meta()`` is what a checkpoint stores."""

    kind: str
    num_outputs: int

    def columns(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"task": self.kind}


class ClassOutputs(Outputs):
    """``pred_label`` and one ``prob_<class>`` column per class (softmax of the logits)."""

    kind = "classification"

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self.index = {name: i for i, name in enumerate(self.class_names)}
        self.num_outputs = len(self.class_names)

    def columns(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        columns = {"pred_label": np.array(self.class_names, dtype=object)[probs.argmax(1)]}
        columns.update({f"prob_{name}": probs[:, i] for i, name in enumerate(self.class_names)})
        return columns

    def meta(self):
        return {"task": self.kind, "label_map": dict(self.index)}


class RegressionOutputs(Outputs):
    """``pred``: the model's standardised output back in the target's units."""

    kind = "regression"
    num_outputs = 1

    def __init__(self, *, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def columns(self, logits):
        return {"pred": np.asarray(logits, dtype=np.float64)[:, 0] * self.std + self.mean}

    def meta(self):
        return {"task": self.kind, "target_mean": self.mean, "target_std": self.std}


def discrete_risk(logits: np.ndarray) -> np.ndarray:
    """(n,) risk = minus the expected number of bins survived (higher = dies sooner)."""
    hazard = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return -np.cumprod(1 - hazard, axis=1).sum(axis=1)


class SurvivalOutputs(Outputs):
    """``risk`` (higher = dies sooner), centred on the training slides' median risk in units
    of their spread; ``survival_bin<k>`` per time bin for discrete-time models.

    ``loss`` is ``"cox"`` (one output, a log hazard ratio) or ``"discrete"`` (K per-bin
    hazard logits, bins cut at ``cuts``).
    """

    kind = "survival"

    def __init__(self, *, loss: str, bins: int, cuts: list[float] | None = None, risk_center: float = 0.0,
                 risk_scale: float = 1.0):
        self.loss = loss
        self.bins = bins
        self.cuts = np.asarray(cuts if cuts is not None else [], dtype=np.float64)
        self.num_outputs = 1 if loss == "cox" else bins
        self.risk_center, self.risk_scale = risk_center, risk_scale

    def raw_risk(self, logits: np.ndarray) -> np.ndarray:
        """(n,) risk before centring."""
        logits = np.asarray(logits, dtype=np.float64)
        return logits[:, 0] if self.loss == "cox" else discrete_risk(logits)

    def columns(self, logits):
        logits = np.asarray(logits, dtype=np.float64)
        columns = {"risk": (self.raw_risk(logits) - self.risk_center) / self.risk_scale}
        if self.loss == "discrete":
            survival = np.cumprod(1 / (1 + np.exp(logits)), axis=1)  # Π (1 - sigmoid(logit))
            columns.update({f"survival_bin{k}": survival[:, k] for k in range(self.bins)})
        return columns

    def meta(self):
        return {"task": self.kind, "survival_loss": self.loss, "time_bins": [float(c) for c in self.cuts],
                "num_bins": self.bins, "risk_center": self.risk_center, "risk_scale": self.risk_scale}


def outputs_from_meta(meta: dict[str, Any]) -> Outputs:
    """The output mapping a checkpoint describes (the keys :meth:`Outputs.meta` wrote)."""
    kind = meta.get("task")
    if kind == "classification":
        label_map = meta["label_map"]
        return ClassOutputs(sorted(label_map, key=label_map.get))
    if kind == "regression":
        return RegressionOutputs(mean=meta["target_mean"], std=meta["target_std"])
    if kind == "survival":
        return SurvivalOutputs(loss=meta["survival_loss"], bins=meta["num_bins"], cuts=meta["time_bins"],
                               risk_center=meta["risk_center"], risk_scale=meta["risk_scale"])
    raise ValueError(f"checkpoint names an unknown task {kind!r}")
