"""The slide–report table of ``histoscope train-report``, its splits, and token batches.

Table columns: ``slide_id``, ``report`` (several rows of one slide are paraphrases of
its report; one is drawn per slide and epoch), optional ``label`` (stage 1),
``patient_id`` (default: the slide), ``split`` (train/val/test) or ``fold``. Without
split or fold, a seeded patient-level hold-out draws the test and validation patients.

Notation: B slides per batch, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histoscope.io.columns import table_reader
from histoscope.language.histogpt import IGNORE_INDEX
from histoscope.train.splits import holdout_patients

__all__ = ["ReportSlide", "assign_roles", "read_reports", "token_batch"]

ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class ReportSlide:
    """One slide with its report's paraphrases."""

    slide_id: str
    patient_id: str
    reports: tuple[str, ...]
    label: str | None = None
    split: str | None = None
    fold: str | None = None


def read_reports(path: str | Path, *, label_column: str = "label") -> list[ReportSlide]:
    """The slides of a report table, in first-appearance order, with their paraphrases.

    A slide's rows must agree on ``patient_id``, ``label``, ``split`` and ``fold``;
    empty reports are errors naming the row.
    """
    path = Path(path)
    reader = table_reader(path, required=("slide_id", "report"), what="report table")
    slides: dict[str, dict] = {}
    for row_number, row in enumerate(reader, start=2):
        where = f"{path}:{row_number}"
        slide_id, report = (row["slide_id"] or "").strip(), (row["report"] or "").strip()
        if not slide_id:
            raise ValueError(f"{where}: empty slide_id")
        if not report:
            raise ValueError(f"{where}: empty report for slide {slide_id!r}; remove the row or write the report")
        values = {"patient_id": (row.get("patient_id") or "").strip() or slide_id,
                  "label": (row.get(label_column) or "").strip() or None,
                  "split": ((row.get("split") or "").strip().lower() or None),
                  "fold": (row.get("fold") or "").strip() or None}
        if values["split"] is not None and values["split"] not in ROLES:
            raise ValueError(f"{where}: split {values['split']!r} must be train, val or test")
        entry = slides.setdefault(slide_id, {**values, "reports": []})
        for key, value in values.items():
            if entry[key] != value:
                raise ValueError(f"{where}: slide {slide_id!r} has {key} {value!r} here and {entry[key]!r} on an "
                                 "earlier row; the rows of one slide must agree")
        entry["reports"].append(report)
    if not slides:
        raise ValueError(f"{path}: no reports (a header and no rows); add one row per slide and report")
    return [ReportSlide(slide_id, e["patient_id"], tuple(e["reports"]), e["label"], e["split"], e["fold"])
            for slide_id, e in slides.items()]


def assign_roles(slides: list[ReportSlide], *, val_fraction: float, test_fraction: float, seed: int,
                 test_fold: str | None = None) -> list[str]:
    """Each slide's role (train/val/test), patients never split across roles.

    A ``split`` column is used as given; with a ``fold`` column, ``test_fold`` (default:
    the first fold) is the test set; otherwise ``test_fraction`` of the patients,
    stratified by label, are drawn with ``seed``. Validation patients are then drawn
    from the training patients when the table names none.
    """
    def stratum(s: ReportSlide) -> str:
        return s.label or ""

    def patients_of(indices) -> dict[str, str]:
        return {slides[i].patient_id: stratum(slides[i]) for i in indices}

    given_split = [s.split for s in slides]
    given_fold = [s.fold for s in slides]
    if any(given_split):
        if not all(given_split):
            raise ValueError("the split column is empty for some slides; fill it for all or for none")
        roles = list(given_split)
    elif any(given_fold):
        if not all(given_fold):
            raise ValueError("the fold column is empty for some slides; fill it for all or for none")
        names = sorted(set(given_fold), key=lambda f: (0, int(f)) if f.lstrip("-").isdigit() else (1, f))
        held = test_fold if test_fold is not None else names[0]
        if held not in names:
            raise ValueError(f"test_fold {held!r} is not a fold of the table ({', '.join(names)})")
        roles = ["test" if f == held else "train" for f in given_fold]
    else:
        test = holdout_patients(patients_of(range(len(slides))), fraction=test_fraction, seed=seed)
        roles = ["test" if s.patient_id in test else "train" for s in slides]
    if "val" not in roles and val_fraction > 0:
        train = [i for i, role in enumerate(roles) if role == "train"]
        val = holdout_patients(patients_of(train), fraction=val_fraction, seed=seed + 1)
        roles = ["val" if role == "train" and slides[i].patient_id in val else role for i, role in enumerate(roles)]
    for role in ("train",):
        if role not in roles:
            raise ValueError("no training slides: the split/fold column or the fractions leave none")
    by_patient: dict[str, str] = {}
    for slide, role in zip(slides, roles):
        if by_patient.setdefault(slide.patient_id, role) != role:
            raise ValueError(f"patient {slide.patient_id!r} has slides in {by_patient[slide.patient_id]!r} and "
                             f"{role!r}; a patient's slides must share one split")
    return roles


def token_batch(prompt: list[int], reports: list[list[int]], *, pad_token_id: int,
                max_report_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing batch: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``.

    Each row is the prompt then the report (cut to ``max_report_tokens``, its last token
    kept: the end token), right-padded; ``labels`` are the ids on report tokens and
    -100 on the prompt and the padding, so the loss is on the report only.
    """
    rows = [prompt + (r if len(r) <= max_report_tokens else r[:max_report_tokens - 1] + r[-1:]) for r in reports]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.as_tensor(row)
        mask[b, :len(row)] = 1
        labels[b, len(prompt):len(row)] = torch.as_tensor(row[len(prompt):])
    return ids, mask, labels


def draw_paraphrase(slide: ReportSlide, *, seed: int, epoch: int, index: int) -> str:
    """The paraphrase a slide trains on in ``epoch`` (a function of seed, epoch and slide)."""
    if len(slide.reports) == 1:
        return slide.reports[0]
    return slide.reports[int(np.random.default_rng([seed, epoch, index]).integers(len(slide.reports)))]
