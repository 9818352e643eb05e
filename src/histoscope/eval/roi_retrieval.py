"""ROI retrieval with faiss: Acc@K and MV@K as UNI reports them.

Every test sample queries the training set (the database). Features are prepared as
for UNI's kNN and prototypes (centred on the training mean, then L2-normalised) and
searched exactly by Euclidean distance (``faiss.IndexFlatL2``, the index UNI's
ProtoNet builds for its retrieval). A query scores at Acc@K when at least one of its
K nearest database samples has its label, and at MV@K when the majority label of
those K is its label; a tied vote goes to the smallest class, as in kNN.

Notation: N database (training) samples, M queries, D dim, K neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoscope.eval.probes import _to_numpy, encode_labels

__all__ = ["RetrievalResult", "retrieval", "retrieval_hits"]


@dataclass(frozen=True)
class RetrievalResult:
    """``metrics``: ``acc@K`` and ``mv@K`` → fraction of queries; ``hits``: the same
    names → (M,) bool per query; ``neighbours`` (M, K) database rows, nearest first."""

    metrics: dict[str, float]
    hits: dict[str, np.ndarray]
    neighbours: np.ndarray


def _faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("ROI retrieval needs faiss: pip install faiss-cpu (or faiss-gpu)") from error
    return faiss


def retrieval_hits(neighbour_labels: np.ndarray, query_labels: np.ndarray, *, ks: Sequence[int] = (1, 3, 5),
                   majority_k: int = 5, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Per-query hits from the class indices (M, K) of the nearest neighbours, nearest first."""
    query_labels = np.asarray(query_labels)
    hits = {f"acc@{k}": (neighbour_labels[:, :k] == query_labels[:, None]).any(1) for k in ks}
    num_classes = num_classes or int(max(neighbour_labels.max(initial=0), query_labels.max(initial=0))) + 1
    votes = np.zeros((len(query_labels), num_classes), dtype=np.int64)
    np.add.at(votes, (np.arange(len(query_labels))[:, None], neighbour_labels[:, :majority_k]), 1)
    hits[f"mv@{majority_k}"] = votes.argmax(1) == query_labels  # argmax: ties to the smallest class
    return hits


def retrieval(train_x, train_y, test_x, test_y, *, ks: Sequence[int] = (1, 3, 5), majority_k: int = 5,
              center: bool = True, normalize: bool = True) -> RetrievalResult:
    """Retrieve the nearest training samples of every test sample; Acc@``ks`` and MV@``majority_k``.

    Parameters
    ----------
    train_x, test_x : (N, D), (M, D) features (numpy arrays or tensors); searched in float32.
    train_y, test_y : (N,), (M,) labels; test labels must occur in training.
    """
    faiss = _faiss()
    classes, train_index, (test_index,) = encode_labels(train_y, test_y)
    database = _to_numpy(train_x).astype(np.float32)
    queries = _to_numpy(test_x).astype(np.float32)
    if center:
        mean = database.mean(0, keepdims=True)
        database, queries = database - mean, queries - mean
    if normalize:
        database = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True), 1e-12)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    depth = max([*ks, majority_k])
    if depth > len(database):
        raise ValueError(f"retrieval needs at least {depth} database samples, got {len(database)}")
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(np.ascontiguousarray(database))
    _, neighbours = index.search(np.ascontiguousarray(queries), depth)  # (M, K) nearest first
    hits = retrieval_hits(train_index[neighbours], test_index, ks=ks, majority_k=majority_k,
                          num_classes=len(classes))
    return RetrievalResult(metrics={name: float(h.mean()) for name, h in hits.items()}, hits=hits,
                           neighbours=neighbours)
