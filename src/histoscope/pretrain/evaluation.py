"""The eval hook: kNN (and optionally linear) probes on a held-out labelled tile set.

The labelled tiles are an image folder, ``ROOT/<class>/*.png`` (split per class with a
seeded shuffle) or ``ROOT/train/<class>/…`` and ``ROOT/test/<class>/…``. They are read
once, resized to the global crop size, embedded by the objective's model exactly as it
will be exported, and probed with ``histoscope.eval``'s kNN (UNI's protocol).

Notation: N images, S crop size, D embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["LabelledTiles", "read_labelled_tiles", "probe"]


@dataclass(frozen=True)
class LabelledTiles:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) str
    train: np.ndarray  # (N,) bool; the others are the test set


def read_labelled_tiles(root: str | Path, *, size: int, test_fraction: float, seed: int) -> LabelledTiles:
    """Images of ``root`` resized to ``size`` x ``size``, with their class and split."""
    import cv2
    from PIL import Image

    from histoscope.io.image_backend import IMAGE_SUFFIXES

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such labelled image folder (eval.images)")
    split_dirs = {"train": root / "train", "test": root / "test"}
    presplit = all(d.is_dir() for d in split_dirs.values())
    entries = []  # (path, label, split or None)
    for split, folder in (split_dirs.items() if presplit else [(None, root)]):
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((path, class_dir.name, split))
    if not entries:
        raise FileNotFoundError(f"{root}: no images in class folders (ROOT/<class>/*.png)")
    labels = np.array([e[1] for e in entries])
    if presplit:
        train = np.array([e[2] == "train" for e in entries])
    else:
        rng = np.random.default_rng(seed)
        train = np.ones(len(entries), dtype=bool)
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            n_test = min(len(members) - 1, max(1, round(len(members) * test_fraction)))
            train[members[:n_test]] = False
    images = np.empty((len(entries), size, size, 3), dtype=np.uint8)
    for i, (path, _, _) in enumerate(entries):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        shrink = pixels.shape[0] > size and pixels.shape[1] > size
        images[i] = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return LabelledTiles(images=images, labels=labels, train=train)


@torch.no_grad()
def embed_tiles(objective, tiles: LabelledTiles, *, device: torch.device, batch_size: int) -> np.ndarray:
    """(N, D) float32 embeddings of the labelled tiles by ``objective.embed``."""
    out = []
    for start in range(0, len(tiles.images), batch_size):
        batch = torch.from_numpy(tiles.images[start : start + batch_size]).to(device)
        out.append(objective.embed(batch).float().cpu().numpy())
    return np.concatenate(out)


def probe(objective, tiles: LabelledTiles, *, device: torch.device, k: int, linear: bool,
          batch_size: int) -> dict[str, float]:
    """kNN (and linear) probe accuracies of the objective's current model."""
    from histoscope.eval import knn_probe, linear_probe

    features = embed_tiles(objective, tiles, device=device, batch_size=batch_size)
    train, test = tiles.train, ~tiles.train
    k = min(k, int(train.sum()))
    args = (features[train], tiles.labels[train], features[test], tiles.labels[test])
    metrics = {"knn_acc": float(knn_probe(*args, k=k).metrics["acc"])}
    if linear:
        metrics["linear_acc"] = float(linear_probe(*args).metrics["acc"])
    return metrics
