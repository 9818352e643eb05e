"""Text↔image retrieval: Recall@K over paired embeddings, as CLIP-style papers report it.

Query i's single correct candidate is candidate ``targets[i]`` (by default i: the image
and caption of one pair). Its rank is 1 + the number of *other* candidates scoring at
least as high: ties count against the query, so a model that scores everything alike
gets the lowest recall instead of a lucky one. Recall@K is the fraction of queries
whose correct candidate ranks K or better.

Notation: Q queries, N candidates, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["retrieval_ranks", "recall_at_k", "image_text_retrieval"]


def retrieval_ranks(similarity, targets=None) -> np.ndarray:
    """1-based rank (Q,) of each query's correct candidate in ``similarity`` (Q, N), ties counted against it."""
    similarity = np.asarray(similarity, dtype=np.float64)
    queries = np.arange(similarity.shape[0])
    targets = queries if targets is None else np.asarray(targets, dtype=np.int64)
    correct = similarity[queries, targets][:, None]  # (Q, 1)
    at_least = (similarity >= correct).sum(1)  # counts the correct candidate itself once
    return at_least.astype(np.int64)


def recall_at_k(similarity, *, ks: Sequence[int] = (1, 5, 10), targets=None) -> dict[str, float]:
    """``{"R@K": fraction}`` of queries (rows of ``similarity`` (Q, N)) with their candidate in the top K."""
    ranks = retrieval_ranks(similarity, targets)
    return {f"R@{k}": float(np.mean(ranks <= k)) if len(ranks) else float("nan") for k in ks}


def image_text_retrieval(image_embeddings, text_embeddings, *, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways for paired (n, E) embeddings (row i of each is one pair), by cosine similarity."""
    images = np.asarray(image_embeddings, dtype=np.float64)
    texts = np.asarray(text_embeddings, dtype=np.float64)
    images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    texts = texts / np.maximum(np.linalg.norm(texts, axis=1, keepdims=True), 1e-12)
    similarity = images @ texts.T  # (n, n) image rows
    metrics = {f"image_to_text_{k}": v for k, v in recall_at_k(similarity, ks=ks).items()}
    metrics.update({f"text_to_image_{k}": v for k, v in recall_at_k(similarity.T, ks=ks).items()})
    return metrics
