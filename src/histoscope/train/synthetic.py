"""Synthetic multiple-instance cohorts with known answers, for tests, demos and sanity checks.

Tile features are Gaussian noise; a few "key" tiles per slide are shifted along one
hidden direction. In the classification cohort the shift makes a slide positive; in
the survival cohort its size sets the slide's risk. A model that learns the task
must find the key tiles, so its tile scores can be checked against them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.io.features_h5 import features_folder, features_path, write_features
from histoscope.tiling.geometry import TileGeometry

__all__ = ["GEOMETRY", "SyntheticCohort", "make_mil_cohort", "make_survival_cohort"]

# Geometry written into the features files: 256 px tiles at 0.5 µm/px from a 0.25 µm/px scan.
GEOMETRY = TileGeometry(size=256, mpp=0.5, size_level0=512, level0_mpp=0.25)


@dataclass(frozen=True)
class SyntheticCohort:
    csv: Path
    features_dir: Path
    key_tiles: dict[str, np.ndarray]  # slide_id → row indices of the shifted tiles
    direction: np.ndarray  # (D,) unit vector of the shift


def _write_cohort(root: Path, rows: list[dict], bags: dict[str, np.ndarray], columns: int) -> tuple[Path, Path]:
    features_dir = features_folder(root, "synthetic")
    step = GEOMETRY.size_level0
    for slide_id, features in bags.items():
        index = np.arange(len(features))
        coords = np.stack([index % columns, index // columns], axis=1) * step
        write_features(features_path(features_dir, slide_id), features, coords, coords_attrs=GEOMETRY.attrs(),
                       features_attrs={"encoder": "synthetic"})
    table = root / "slides.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, features_dir


def _generator_and_direction(seed: int, dim: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    return rng, direction / np.linalg.norm(direction)


def _bag(rng, tiles: tuple[int, int], dim: int, key: tuple[int, int], shift: float, direction: np.ndarray):
    n = int(rng.integers(tiles[0], tiles[1] + 1))
    features = rng.normal(size=(n, dim)).astype(np.float32)
    chosen = np.sort(rng.choice(n, size=min(n, int(rng.integers(key[0], key[1] + 1))), replace=False))
    features[chosen] += (shift * direction).astype(np.float32)
    return features, chosen


def make_mil_cohort(root: str | Path, *, slides: int = 40, dim: int = 32, tiles: tuple[int, int] = (50, 120),
                    key: tuple[int, int] = (3, 5), shift: float = 5.0, slides_per_patient: int = 1,
                    columns: int = 16, seed: int = 0) -> SyntheticCohort:
    """Binary cohort: ``positive`` slides hold ``key`` tiles shifted by ``shift`` σ; ``negative`` none.

    Patients alternate between classes and own ``slides_per_patient`` consecutive slides,
    all with the patient's label.
    """
    rng, direction = _generator_and_direction(seed, dim)
    rows, bags, key_tiles = [], {}, {}
    for i in range(slides):
        patient = i // slides_per_patient
        positive = patient % 2 == 1
        slide_id = f"slide_{i:03d}"
        features, chosen = _bag(rng, tiles, dim, key, shift if positive else 0.0, direction)
        bags[slide_id] = features
        key_tiles[slide_id] = chosen if positive else np.zeros(0, dtype=np.int64)
        rows.append({"slide_id": slide_id, "patient_id": f"patient_{patient:03d}",
                     "label": "positive" if positive else "negative"})
    table, features_dir = _write_cohort(Path(root), rows, bags, columns)
    return SyntheticCohort(table, features_dir, key_tiles, direction)


def make_survival_cohort(root: str | Path, *, slides: int = 60, dim: int = 32, tiles: tuple[int, int] = (50, 120),
                         key: tuple[int, int] = (3, 5), shift: float = 8.0, censored: float = 0.25,
                         noise: float = 0.2, columns: int = 16, seed: int = 0) -> SyntheticCohort:
    """Survival cohort: slide risk r ~ U(0, 1) shifts its key tiles by ``shift * r`` σ.

    Survival time is ``exp(-3 r) * lognormal(0, noise)``; a ``censored`` fraction of
    slides is censored at a uniform fraction of their time.
    """
    rng, direction = _generator_and_direction(seed, dim)
    rows, bags, key_tiles = [], {}, {}
    for i in range(slides):
        risk = rng.uniform()
        slide_id = f"slide_{i:03d}"
        features, chosen = _bag(rng, tiles, dim, key, shift * risk, direction)
        bags[slide_id], key_tiles[slide_id] = features, chosen
        time = float(np.exp(-3 * risk + noise * rng.normal()))
        event = 1
        if rng.uniform() < censored:
            time, event = time * rng.uniform(0.3, 1.0), 0
        rows.append({"slide_id": slide_id, "patient_id": f"patient_{i:03d}", "time": round(time, 6),
                     "event": event, "risk": round(risk, 6)})
    table, features_dir = _write_cohort(Path(root), rows, bags, columns)
    return SyntheticCohort(table, features_dir, key_tiles, direction)
