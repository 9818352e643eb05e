"""Few-shot episodes with SimpleShot prototypes, as UNI evaluates tile encoders.

An episode draws ``n_way`` classes and ``n_shot`` training samples of each (UNI's
``FewShotEpisodeSampler``: ``torch.randperm`` over the classes, then per class
``torch.multinomial`` over its samples without replacement, all from one torch
generator, so ``seed`` s reproduces the episodes UNI draws after
``torch.manual_seed(s)``). Every test sample is a query (UNI's ``n_query=-1``). Within
an episode the support set's own mean centres support and queries, both are
L2-normalised, each class's prototype is the mean of its normalised shots, and the
nearest prototype by Euclidean distance is the prediction; metrics are ``acc``,
``bacc``, ``kappa`` and ``weighted_f1`` per episode, summarised as mean and std
(ddof 1, as pandas computes it).

All episodes are evaluated together in chunks: distances to every episode's
prototypes come from one matrix product of the queries with the stacked prototypes
and support means (the per-episode centring and normalisation expanded
algebraically), and the per-episode metrics from a batch of confusion matrices.

Notation: E episodes, S = n_way·n_shot support samples, M queries, D dim, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoscope.eval.metrics import confusion_matrices, confusion_scores
from histoscope.eval.probes import _to_numpy, _to_tensor, encode_labels

__all__ = ["FewShotResult", "fewshot", "sample_episodes"]

_CHUNK_BYTES = 256 * 2**20  # working memory of one chunk of episodes


@dataclass(frozen=True)
class FewShotResult:
    """``per_episode``: metric -> (E,) values; ``metrics``: metric -> {"mean", "std"};
    ``support_indices`` (E, S) rows of the training set (replayable); ``classes`` (C,)."""

    n_shot: int
    n_way: int
    per_episode: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    support_indices: np.ndarray
    classes: np.ndarray


def sample_episodes(train_index: np.ndarray, *, num_classes: int, n_shot: int, n_way: int, n_episodes: int,
                    seed: int = 0) -> np.ndarray:
    """(E, n_way·n_shot) support rows, drawn as UNI's sampler draws them.

    ``train_index`` (N,) holds class indices 0 … C-1; each episode lists its classes'
    shots class by class, in the order the classes were drawn.
    """
    members = [np.flatnonzero(train_index == c) for c in range(num_classes)]
    small = [(c, len(m)) for c, m in enumerate(members) if len(m) < n_shot]
    if small:
        raise ValueError(f"{n_shot}-shot episodes need {n_shot} training samples per class; class index "
                         f"{small[0][0]} has {small[0][1]}")
    generator = torch.Generator().manual_seed(seed)
    ones = [torch.ones(len(m)) for m in members]
    episodes = np.empty((n_episodes, n_way * n_shot), dtype=np.int64)
    for e in range(n_episodes):
        classes = torch.randperm(num_classes, generator=generator)[:n_way].tolist()
        episodes[e] = np.concatenate([members[c][torch.multinomial(ones[c], n_shot, generator=generator).numpy()]
                                      for c in classes])
    return episodes


def _prototypes(source: torch.Tensor, squared_norms: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prototypes (E, C, D), support means (E, D), shots per class (E, C))``.

    ``source`` (E, S, D) support features, ``squared_norms`` (E, S) their ‖s‖², ``labels``
    (E, S). A prototype is the mean of (s − m)/‖s − m‖ over its class; expanding
    ‖s − m‖² = ‖s‖² − 2 s·m + ‖m‖² and Σ w (s − m) = Σ w s − (Σ w) m reads the support
    rows three times and never writes a centred or normalised copy of them.
    """
    mean = source.mean(dim=1)  # (E, D)
    dots = torch.bmm(source, mean[..., None])[..., 0]  # s·m (E, S)
    norms = (squared_norms - 2 * dots + (mean * mean).sum(-1, keepdim=True)).clamp_min(0).sqrt()
    onehot = F.one_hot(labels, num_classes).to(source.dtype)  # (E, S, C)
    counts = onehot.sum(1)  # (E, C)
    weights = onehot / norms.clamp_min(1e-12)[..., None] / counts.clamp_min(1)[:, None, :]  # F.normalize's eps
    prototypes = torch.bmm(weights.transpose(1, 2), source) - weights.sum(1)[..., None] * mean[:, None]
    return prototypes, mean, counts


def _nearest_prototypes(query: torch.Tensor, prototypes: torch.Tensor, mean: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
    """Nearest-prototype class (E, M) of every query in every episode of a chunk.

    With m the support mean, q̂ = (q − m)/‖q − m‖ and p a prototype,
    ‖q̂ − p‖² = ‖q̂‖² − 2 (q·p − m·p)/‖q − m‖ + ‖p‖², and ‖q − m‖² = ‖q‖² − 2 q·m + ‖m‖²:
    one product of the queries (M, D) with every prototype and mean gives all distances.
    """
    episodes, num_classes = counts.shape
    products = query @ torch.cat([prototypes.reshape(-1, query.shape[1]), mean]).T  # (M, E·C + E)
    query_prototype = products[:, : episodes * num_classes].reshape(-1, episodes, num_classes)  # (M, E, C)
    query_mean = products[:, episodes * num_classes :]  # (M, E)
    centred_sq = ((query * query).sum(1)[:, None] - 2 * query_mean + (mean * mean).sum(1)[None]).clamp_min(0)
    scale = centred_sq.sqrt().clamp_min(1e-12)  # ‖q − m‖, with F.normalize's eps
    dot = (query_prototype - (prototypes * mean[:, None]).sum(-1)[None]) / scale[..., None]
    distances = (centred_sq / scale**2)[..., None] - 2 * dot + (prototypes * prototypes).sum(-1)[None]
    distances = distances.masked_fill(counts[None] == 0, float("inf"))  # classes outside the episode
    return distances.argmin(dim=-1).T  # (E, M)


@torch.no_grad()
def fewshot(train_x, train_y, test_x, test_y, *, n_shot: int, n_way: int | None = None, n_episodes: int = 1000,
            seed: int = 0, support_indices=None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> FewShotResult:
    """UNI's few-shot evaluation: SimpleShot on ``n_episodes`` sampled support sets.

    Parameters
    ----------
    train_x, test_x : (N, D), (M, D) features, numpy arrays or tensors.
    train_y, test_y : (N,), (M,) labels; every test label must occur in training.
    n_shot : training samples per class in each episode.
    n_way : classes per episode (default: all, UNI's ``n_way=-1``); the queries are
        always the whole test set, as in the reference.
    n_episodes, seed : how many episodes, drawn from a torch generator seeded with ``seed``.
    support_indices : (E, S) training rows to replay given episodes instead of sampling;
        a row may list its shots in any order.
    device, dtype : where and in which precision distances are computed.
    """
    classes, train_index, (test_index,) = encode_labels(train_y, test_y)
    num_classes = len(classes)
    n_way = num_classes if n_way is None else n_way
    if not 1 <= n_way <= num_classes:
        raise ValueError(f"n_way must lie in 1 … {num_classes} (the training classes), got {n_way}")
    if support_indices is None:
        support = sample_episodes(train_index, num_classes=num_classes, n_shot=n_shot, n_way=n_way,
                                  n_episodes=n_episodes, seed=seed)
    else:
        support = np.asarray(_to_numpy(support_indices), dtype=np.int64)
        if support.ndim != 2 or support.size == 0 or support.min() < 0 or support.max() >= len(train_index):
            raise ValueError(f"support_indices must be (episodes, n_way·n_shot) rows of the {len(train_index)} "
                             f"training samples, got shape {support.shape}")
    source_all = _to_tensor(train_x, device, dtype)
    # Distances do not change under a common shift; shifting by the training mean keeps
    # the expanded ‖q − m‖² free of cancellation when features share a large offset.
    offset = source_all.mean(dim=0, keepdim=True)
    source_all = source_all - offset
    query = _to_tensor(test_x, device, dtype) - offset
    squared_norms_all = (source_all * source_all).sum(1)
    labels_all = torch.from_numpy(train_index).to(source_all.device)
    rows = torch.from_numpy(support).to(source_all.device)
    per_episode_bytes = source_all.element_size() * (support.shape[1] * (source_all.shape[1] + 2 * num_classes)
                                                     + 4 * len(query) * (num_classes + 1))
    chunk = max(1, _CHUNK_BYTES // per_episode_bytes)
    confusion = []
    for start in range(0, len(support), chunk):
        index = rows[start : start + chunk]
        prototypes, mean, counts = _prototypes(source_all[index], squared_norms_all[index], labels_all[index],
                                               num_classes)
        pred_index = _nearest_prototypes(query, prototypes, mean, counts).cpu().numpy()
        confusion.append(confusion_matrices(np.broadcast_to(test_index, pred_index.shape), pred_index, num_classes))
    scores = confusion_scores(np.concatenate(confusion))  # metric -> (E,)
    summary = {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")}
               for name, v in scores.items()}
    return FewShotResult(n_shot=n_shot, n_way=n_way,
                         per_episode=scores, metrics=summary, support_indices=support, classes=classes)
