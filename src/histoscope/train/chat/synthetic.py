"""Synthetic slides whose tile features encode a diagnosis and a second finding, with LLaVA
conversations about them: a known-answer task for the assistant (tests, benchmark, demo).

Each slide's tiles are Gaussian noise; a random half of them carry the direction of the
slide's diagnosis, and a random third that of its finding (necrosis present or absent).
Nothing else tells the classes apart, so an assistant answers above chance only by
reading the image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoscope.io.features_h5 import features_path, write_features

__all__ = ["DIAGNOSES", "FINDINGS", "QUESTIONS", "SyntheticChat", "make_synthetic_chat", "zero_features"]

DIAGNOSES = ("melanoma", "basal cell carcinoma", "squamous cell carcinoma", "dermal nevus")
FINDINGS = ("Yes, necrosis is present.", "No, there is no necrosis.")
QUESTIONS = ("What is the diagnosis?", "Is there necrosis?")
_DIAGNOSIS_VARIANTS = ("What is the diagnosis?", "What is the most likely diagnosis?")
_TEXT_ONLY = [("What does H&E stand for?", "Hematoxylin and eosin."),
              ("Which stain shows nuclei in blue?", "Hematoxylin stains nuclei blue."),
              ("What is a nevus?", "A nevus is a benign melanocytic lesion.")]


@dataclass(frozen=True)
class SyntheticChat:
    """``conversations`` (LLaVA JSON of the training slides), ``features_dir`` (every slide's
    features), ``heldout`` slide ids with their ``diagnosis`` and ``finding`` (0 present, 1 absent)."""

    conversations: Path
    features_dir: Path
    heldout: list[str]
    diagnosis: dict[str, str]
    finding: dict[str, int]


def make_synthetic_chat(folder: str | Path, *, train_slides: int = 240, heldout_slides: int = 40,
                        tiles: int = 24, dim: int = 16, seed: int = 0) -> SyntheticChat:
    folder = Path(folder)
    features_dir = folder / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # orthogonal class directions of norm 5 (noise: norm ~sqrt(dim) per tile)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, len(DIAGNOSES) + len(FINDINGS))))
    prototypes = 5.0 * basis.T
    items, diagnosis, finding, ids = [], {}, {}, []
    for index in range(train_slides + heldout_slides):
        slide = f"slide_{index:04d}"
        d, f = int(rng.integers(len(DIAGNOSES))), int(rng.integers(len(FINDINGS)))
        x = rng.standard_normal((tiles, dim))
        x[rng.random(tiles) < 0.5] += prototypes[d]
        x[rng.random(tiles) < 0.35] += prototypes[len(DIAGNOSES) + f]
        coords = np.stack([np.arange(tiles) * 256, np.zeros(tiles)], axis=1)
        write_features(features_path(features_dir, slide), x.astype(np.float32), coords)
        diagnosis[slide], finding[slide] = DIAGNOSES[d], f
        ids.append(slide)
        if index < train_slides:
            question = _DIAGNOSIS_VARIANTS[index % len(_DIAGNOSIS_VARIANTS)]
            turns = [(f"<image>\n{question}", f"{DIAGNOSES[d].capitalize()}.")]
            if index % 5:  # most conversations go on to the finding; some ask about it alone
                turns.append((QUESTIONS[1], FINDINGS[f]))
            else:
                turns = [(f"<image>\n{QUESTIONS[1]}", FINDINGS[f])]
            items.append({"id": slide, "image": slide, "conversations": [
                message for q, a in turns for message in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]})
    for index in range(max(1, train_slides // 20)):
        q, a = _TEXT_ONLY[index % len(_TEXT_ONLY)]
        items.append({"id": f"text_{index}", "conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": a}]})
    conversations = folder / "conversations.json"
    conversations.write_text(json.dumps(items, indent=1))
    heldout = ids[train_slides:]
    return SyntheticChat(conversations, features_dir, heldout, {s: diagnosis[s] for s in heldout},
                         {s: finding[s] for s in heldout})


def zero_features(source: str | Path, target: str | Path, slides: list[str]) -> Path:
    """Copies of ``slides``' features files in ``target`` with every feature set to 0."""
    from histoscope.io.features_h5 import read_features

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        features, coords, _ = read_features(features_path(source, slide))
        write_features(features_path(target, slide), np.zeros_like(features), coords)
    return target
