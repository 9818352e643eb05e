"""Linear probe, kNN and SimpleShot on frozen features, as UNI evaluates tile encoders.

Each protocol replicates ``uni/downstream/eval_patch_features`` (mahmoodlab/UNI), the
code behind UNI's published tables:

- linear probe: multinomial logistic regression ``nn.Linear(D, C)`` from zero weights,
  loss = mean cross-entropy + (1/cost) · ½‖W‖₂ (the Frobenius norm itself, not its
  square; the bias is not penalised) with cost = D·C/100, minimised by one call of
  ``torch.optim.LBFGS(max_iter, line_search_fn="strong_wolfe")`` on the whole training
  set; features used as they come; a validation set is appended to the training set
  (UNI's ``combine_trainval``) rather than searched over.
- kNN: features centred on the training mean, then L2-normalised (CL2N); the k = 20
  nearest training samples by Euclidean distance vote with equal weights, a tied vote
  going to the smallest class (scikit-learn's ``KNeighborsClassifier``).
- SimpleShot: CL2N as for kNN; one prototype per class, the mean of its normalised
  training features (not normalised again); the nearest prototype by Euclidean
  distance wins.

Metrics are :func:`~histoscope.eval.metrics.probe_metrics`; AUROC only where the
reference has probabilities (the linear probe).

Notation: N training samples, M test samples, D feature dim, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoscope.eval.metrics import probe_metrics

__all__ = ["ProbeResult", "linear_probe", "knn_probe", "simpleshot", "fit_logistic_regression", "center_l2",
           "encode_labels"]


@dataclass(frozen=True)
class ProbeResult:
    """What a protocol predicts for the test set, and how well.

    ``metrics``: ``acc``, ``bacc``, ``kappa``, ``weighted_f1`` (+ ``auroc`` where ``probs``
    exist); ``preds`` (M,) predicted labels in the caller's label values; ``probs``
    (M, C) class probabilities in the order of ``classes`` or None; ``classes`` (C,)
    the sorted training labels; ``targets`` (M,) and ``pred_index`` (M,) the true and
    predicted class indices into ``classes``.
    """

    metrics: dict[str, float]
    preds: np.ndarray
    probs: np.ndarray | None
    classes: np.ndarray
    targets: np.ndarray
    pred_index: np.ndarray


def _to_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=dtype)


def _to_numpy(y) -> np.ndarray:
    return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


def encode_labels(train_y, *others) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(classes (C,), train indices (N,), [indices of each other label array])``.

    Classes are the sorted distinct training labels; a label in ``others`` that the
    training set lacks is an error (no protocol can predict it).
    """
    train_y = _to_numpy(train_y)
    classes, train_index = np.unique(train_y, return_inverse=True)
    encoded = []
    for y in others:
        y = _to_numpy(y)
        index = np.searchsorted(classes, y)
        index = np.clip(index, 0, len(classes) - 1)
        unknown = classes[index] != y
        if unknown.any():
            raise ValueError(f"labels {sorted(set(y[unknown].tolist()))[:5]} are not among the training labels "
                             f"{classes.tolist()[:10]}; every evaluated class needs training samples")
        encoded.append(index)
    return classes, train_index, encoded


def _result(classes, targets, pred_index, probs) -> ProbeResult:
    return ProbeResult(metrics=probe_metrics(targets, pred_index, probs), preds=classes[pred_index], probs=probs,
                       classes=classes, targets=targets, pred_index=pred_index)


def _check_shapes(train_x, train_y, test_x, test_y) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got {tuple(train_x.shape)} "
                         f"and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: {len(train_x)} vs {len(train_y)} (train), "
                         f"{len(test_x)} vs {len(test_y)} (test)")


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, cost: float,
                            max_iter: int = 1000) -> nn.Linear:
    """UNI's torch logistic regression on ``x`` (N, D), ``y`` (N,) class indices.

    Zero-initialised ``nn.Linear(D, C)``; loss ``CE + (1/cost) · (½‖W‖₂)``; one
    ``LBFGS.step`` with ``max_iter`` iterations, strong-Wolfe line search and torch's
    default tolerances (grad 1e-7, change 1e-9, history 100, lr 1).
    """
    linear = nn.Linear(x.shape[1], num_classes, bias=True).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), line_search_fn="strong_wolfe", max_iter=max_iter)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + (1.0 / cost) * (0.5 * linear.weight.norm(p=2))
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may evaluate inside no_grad (e.g. during pretraining)
        optimizer.step(closure)
    return linear.requires_grad_(False)


def linear_probe(train_x, train_y, test_x, test_y, *, val_x=None, val_y=None, max_iter: int = 1000,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ProbeResult:
    """UNI's linear probe: L-BFGS logistic regression on frozen features.

    Parameters
    ----------
    train_x, test_x : (N, D), (M, D) features, numpy arrays or tensors.
    train_y, test_y : (N,), (M,) labels (any sortable values; test labels must occur in training).
    val_x, val_y : optional validation set, appended to the training set as UNI does.
    max_iter : L-BFGS iterations (UNI: 1000).
    device, dtype : where and in which precision the regression is fitted.

    Returns
    -------
    ProbeResult with ``probs`` (M, C) softmax probabilities and ``auroc``.
    """
    _check_shapes(train_x, train_y, test_x, test_y)
    if (val_x is None) != (val_y is None):
        raise ValueError("pass both val_x and val_y, or neither")
    classes, train_index, (test_index, *val_index) = encode_labels(train_y, test_y,
                                                                     *([] if val_y is None else [val_y]))
    x = _to_tensor(train_x, device, dtype)
    y = torch.from_numpy(train_index).to(device)
    cost = x.shape[1] * len(classes) / 100  # set from the training split alone, before val is appended
    if val_x is not None:
        x = torch.cat([x, _to_tensor(val_x, device, dtype)])
        y = torch.cat([y, torch.from_numpy(val_index[0]).to(device)])
    linear = fit_logistic_regression(x, y, num_classes=len(classes), cost=cost, max_iter=max_iter)
    del x, y
    with torch.no_grad():
        probs = linear(_to_tensor(test_x, device, dtype)).softmax(dim=-1)
    pred_index = probs.argmax(dim=1).cpu().numpy()
    return _result(classes, test_index, pred_index, probs.double().cpu().numpy())


def center_l2(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """CL2N: subtract the training mean (per feature), then L2-normalise every row."""
    mean = train_x.mean(dim=0, keepdim=True)
    return [F.normalize(x - mean, dim=-1, p=2) for x in (train_x, *others)]


def _squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(M, D), (K, D) -> (M, K) squared Euclidean distances."""
    return ((queries * queries).sum(1, keepdim=True) - 2 * queries @ keys.T
            + (keys * keys).sum(1)[None]).clamp_min_(0)


def _prepare(train_x, test_x, center: bool, normalize: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    source, query = _to_tensor(train_x, device, dtype), _to_tensor(test_x, device, dtype)
    if center:
        mean = source.mean(dim=0, keepdim=True)
        source, query = source - mean, query - mean
    if normalize:
        source, query = F.normalize(source, dim=-1, p=2), F.normalize(query, dim=-1, p=2)
    return source, query


@torch.no_grad()
def knn_probe(train_x, train_y, test_x, test_y, *, k: int = 20, center: bool = True, normalize: bool = True,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              batch_size: int = 1024) -> ProbeResult:
    """UNI's kNN: CL2N features, majority vote of the ``k`` nearest training samples.

    Queries are processed ``batch_size`` at a time, so memory stays at (batch, N).
    ``probs`` is None, as in the reference (no AUROC for kNN).
    """
    _check_shapes(train_x, train_y, test_x, test_y)
    classes, train_index, (test_index,) = encode_labels(train_y, test_y)
    if not 1 <= k <= len(train_index):
        raise ValueError(f"k = {k} neighbours, but the training set has {len(train_index)} samples")
    source, query = _prepare(train_x, test_x, center, normalize, device, dtype)
    labels = torch.from_numpy(train_index).to(source.device)
    preds = []
    for start in range(0, len(query), batch_size):
        distances = _squared_distances(query[start : start + batch_size], source)  # (b, N)
        nearest = distances.topk(k, dim=1, largest=False).indices  # (b, k)
        votes = torch.zeros(len(nearest), len(classes), device=source.device)
        votes.scatter_add_(1, labels[nearest], torch.ones_like(nearest, dtype=votes.dtype))
        preds.append(votes.argmax(dim=1))  # the first maximum: ties go to the smallest class
    pred_index = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, np.int64)
    return _result(classes, test_index, pred_index, None)


@torch.no_grad()
def simpleshot(train_x, train_y, test_x, test_y, *, center: bool = True, normalize: bool = True,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ProbeResult:
    """SimpleShot (UNI's ProtoNet): CL2N features, nearest class-mean prototype.

    ``probs`` is None, as in the reference (no AUROC for prototypes).
    """
    _check_shapes(train_x, train_y, test_x, test_y)
    classes, train_index, (test_index,) = encode_labels(train_y, test_y)
    source, query = _prepare(train_x, test_x, center, normalize, device, dtype)
    onehot = F.one_hot(torch.from_numpy(train_index).to(source.device), len(classes)).to(source.dtype)  # (N, C)
    prototypes = (onehot.T @ source) / onehot.sum(0)[:, None]  # (C, D)
    pred_index = _squared_distances(query, prototypes).argmin(dim=1).cpu().numpy()
    return _result(classes, test_index, pred_index, None)
