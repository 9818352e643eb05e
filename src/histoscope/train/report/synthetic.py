"""A synthetic slide–report set with known answers, for tests, demos and sanity checks.

Every slide has a diagnosis and a margin status. Its tile features are Gaussian noise;
some tiles are shifted along the diagnosis's hidden direction, others along the margin
status's, so both findings are in the image and only there: each report states both in
one of several phrasings (paraphrase rows), and a model that writes the right findings
for held-out slides must have read them off the features.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.train.synthetic import _write_cohort

__all__ = ["DIAGNOSES", "MARGINS", "SyntheticReports", "make_report_cohort"]

DIAGNOSES = ("basal cell carcinoma", "squamous cell carcinoma", "melanocytic nevus")
MARGINS = ("free", "involved")
_PHRASINGS = ("{D}. The margins are {m}.", "The lesion is a {d}; margins {m}.", "{D}, with {m} excision margins.")


@dataclass(frozen=True)
class SyntheticReports:
    csv: Path  # slide_id, report (one row per paraphrase), label, patient_id
    features_dir: Path
    truth: dict[str, tuple[str, str]]  # slide_id → (diagnosis, margin status)
    key_tiles: dict[str, tuple[np.ndarray, np.ndarray]]  # slide_id → rows shifted by (diagnosis, margin status)


def make_report_cohort(root: str | Path, *, slides: int = 300, dim: int = 16, tiles: tuple[int, int] = (24, 40),
                       key_fraction: float = 0.3, shift: float = 2.5, paraphrases: int = 2,
                       label: str = "diagnosis", seed: int = 0) -> SyntheticReports:
    """Write ``slides`` features files and a report table with ``paraphrases`` rows per slide.

    Diagnoses cycle through :data:`DIAGNOSES` and margins are drawn independently; in a
    slide, ``key_fraction`` of the tiles carry the diagnosis's shift and as many (others)
    the margin status's, each ``shift`` σ along its own unit direction. The ``label``
    column (stage 1's target) is the ``"diagnosis"``, or both ``"findings"``
    (``"basal cell carcinoma, margins free"``).
    """
    if label not in ("diagnosis", "findings"):
        raise ValueError(f"label must be diagnosis or findings, got {label!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(DIAGNOSES) + len(MARGINS)]  # orthonormal rows
    bags, rows, table, truth, key_tiles = {}, [], [], {}, {}
    for i in range(slides):
        slide_id = f"slide_{i:03d}"
        diagnosis, margin = i % len(DIAGNOSES), int(rng.integers(len(MARGINS)))
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        features = rng.normal(size=(n, dim))
        order = rng.permutation(n)
        k = max(1, int(round(key_fraction * n)))
        features[order[:k]] += shift * directions[diagnosis]
        features[order[k:2 * k]] += shift * directions[len(DIAGNOSES) + margin]
        bags[slide_id] = features.astype(np.float32)
        key_tiles[slide_id] = (np.sort(order[:k]), np.sort(order[k:2 * k]))
        rows.append({"slide_id": slide_id})
        d, m = DIAGNOSES[diagnosis], MARGINS[margin]
        truth[slide_id] = (d, m)
        for j in rng.permutation(len(_PHRASINGS))[:paraphrases]:
            table.append({"slide_id": slide_id, "report": _PHRASINGS[j].format(D=d.capitalize(), d=d, m=m),
                          "label": d if label == "diagnosis" else f"{d}, margins {m}", "patient_id": f"patient_{i:03d}"})
    _, features_dir = _write_cohort(root, rows, bags, columns=8)
    path = root / "reports.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return SyntheticReports(path, features_dir, truth, key_tiles)
