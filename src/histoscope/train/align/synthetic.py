"""A synthetic image–text pair set with a known answer, for tests, demos and sanity checks.

Each pair has a tissue class and a pattern; its features vector (a ``.npy`` file, or a
small PNG whose colour is the class and whose brightness is the pattern) encodes
both, and its caption names both in one of several phrasings. The class words never
appear in a caption of another class, so a model that aligns images with captions can
classify held-out images zero-shot from prompts such as "an image of stroma.".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

__all__ = ["SyntheticPairs", "make_synthetic_pairs", "CLASSES", "PATTERNS"]

CLASSES = ("adipose", "lymphocytes", "stroma", "necrosis")
PATTERNS = ("dense", "sparse", "focal", "diffuse")
_CAPTIONS = ("{p} {c}.", "a {p} area of {c}.", "{c} with a {p} pattern.", "photomicrograph showing {p} {c}.",
             "section of {c}, {p}.", "H&E image: {c} ({p}).")
_PROMPT_TEMPLATES = ("an image of CLASSNAME.", "CLASSNAME.", "a photomicrograph of CLASSNAME.")
_COLOURS = np.array([[230, 200, 60], [60, 60, 200], [220, 120, 170], [120, 200, 120]], dtype=np.float64)


@dataclass(frozen=True)
class SyntheticPairs:
    csv: Path  # image | features, caption, split, label
    prompts: Path  # YAML class prompts for zero-shot classification
    classes: tuple[str, ...]


def make_synthetic_pairs(root: str | Path, *, per_class: int = 60, dim: int = 32, noise: float = 0.6,
                         kind: str = "features", test_fraction: float = 0.25, image_size: int = 32,
                         seed: int = 0) -> SyntheticPairs:
    """Write ``per_class`` pairs per class under ``root``; a seeded ``test_fraction`` is marked ``split=test``.

    ``kind="features"`` writes (D,) vectors: a class direction plus a smaller pattern
    direction plus Gaussian noise. ``kind="image"`` writes RGB PNGs: the class colour
    scaled by the pattern's brightness, plus pixel noise.
    """
    if kind not in ("features", "image"):
        raise ValueError(f"kind must be 'features' or 'image', got {kind!r}")
    root = Path(root)
    folder = root / ("features" if kind == "features" else "images")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_dirs = np.linalg.qr(rng.standard_normal((dim, dim)))[0][: len(CLASSES) + len(PATTERNS)]
    rows = []
    for index in range(per_class * len(CLASSES)):
        c, p = index % len(CLASSES), int(rng.integers(len(PATTERNS)))
        name = f"pair_{index:04d}"
        if kind == "features":
            vector = 3.0 * class_dirs[c] + 1.5 * class_dirs[len(CLASSES) + p] + noise * rng.standard_normal(dim)
            path = folder / f"{name}.npy"
            np.save(path, vector.astype(np.float32))
        else:
            from PIL import Image

            colour = _COLOURS[c] * (0.55 + 0.15 * p)
            pixels = colour + 25 * rng.standard_normal((image_size, image_size, 3))
            path = folder / f"{name}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        caption = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))].format(c=CLASSES[c], p=PATTERNS[p])
        split = "test" if rng.random() < test_fraction else ""
        rows.append({kind: path.relative_to(root).as_posix(), "caption": caption, "split": split,
                     "label": CLASSES[c]})
    table = root / "pairs.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prompts = root / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"classnames": {c: [c] for c in CLASSES},
                                       "templates": list(_PROMPT_TEMPLATES)}, sort_keys=False))
    return SyntheticPairs(csv=table, prompts=prompts, classes=CLASSES)
