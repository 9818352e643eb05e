"""Patient-level, stratified cross-validation splits.

All slides of a patient land in the same split, so no patient is both trained and
tested on. Patients are dealt to folds stratum by stratum (the label, or the event
indicator for survival), each to the fold holding the fewest slides of its stratum,
which keeps class balance and fold sizes even when patients have several slides.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from histoscope.train.data import Sample

__all__ = ["Split", "make_splits", "kfold_patients", "holdout_patients"]


@dataclass(frozen=True)
class Split:
    """Row indices into the slide table for one fold."""

    fold: str
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def _patient_strata(samples: list[Sample], strata: np.ndarray) -> dict[str, object]:
    """Each patient's stratum: the most common one among their slides."""
    by_patient: dict[str, Counter] = defaultdict(Counter)
    for sample, stratum in zip(samples, strata):
        by_patient[sample.patient_id][stratum] += 1
    return {p: sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0] for p, c in by_patient.items()}


def kfold_patients(patient_stratum: dict[str, object], slides_per_patient: Counter, *, folds: int,
                   seed: int) -> dict[str, int]:
    """Patient → fold index in ``0 … folds-1``."""
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    total = np.zeros(folds)
    for stratum in sorted(set(patient_stratum.values()), key=str):
        patients = sorted(p for p, s in patient_stratum.items() if s == stratum)
        patients = [patients[i] for i in rng.permutation(len(patients))]
        patients.sort(key=lambda p: -slides_per_patient[p])  # big patients first, then fill in (stable)
        in_stratum = np.zeros(folds)
        for patient in patients:
            fold = min(range(folds), key=lambda k: (in_stratum[k], total[k], k))
            assignment[patient] = fold
            in_stratum[fold] += slides_per_patient[patient]
            total[fold] += slides_per_patient[patient]
    return assignment


def holdout_patients(patient_stratum: dict[str, object], *, fraction: float, seed: int) -> set[str]:
    """About ``fraction`` of the patients of every stratum (at least one of a stratum of two or more)."""
    if fraction <= 0:
        return set()
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for stratum in sorted(set(patient_stratum.values()), key=str):
        patients = sorted(p for p, s in patient_stratum.items() if s == stratum)
        count = int(round(fraction * len(patients)))
        if len(patients) >= 2:
            count = min(max(count, 1), len(patients) - 1)
        chosen.update(patients[i] for i in rng.permutation(len(patients))[:count])
    return chosen


def _check_patients_in_one_group(samples: list[Sample], group_of, what: str) -> None:
    seen: dict[str, str] = {}
    for sample in samples:
        group = group_of(sample)
        if seen.setdefault(sample.patient_id, group) != group:
            raise ValueError(f"patient {sample.patient_id!r} has slides in {what} {seen[sample.patient_id]!r} "
                             f"and {group!r}; a patient's slides must share one {what}")


def make_splits(samples: list[Sample], strata, *, folds: int, val_fraction: float, seed: int) -> list[Split]:
    """Cross-validation splits of the slide table.

    A ``fold`` column is honoured as given (fold k tests on its rows and trains on the
    rest); otherwise a ``split`` column gives one train/val/test split; otherwise
    patients are dealt into ``folds`` stratified folds. Validation patients are then
    taken (stratified) from each fold's training patients when the table names none.
    """
    strata = np.asarray(strata)
    given_folds = [s.fold for s in samples]
    given_splits = [s.split for s in samples]
    if any(f is not None for f in given_folds):
        if any(f is None for f in given_folds):
            raise ValueError("the fold column is empty for some slides; fill it for all or for none")
        _check_patients_in_one_group(samples, lambda s: s.fold, "fold")
        names = sorted(set(given_folds), key=lambda f: (0, int(f)) if f.lstrip("-").isdigit() else (1, f))
        test_sets = {name: {i for i, f in enumerate(given_folds) if f == name} for name in names}
    elif any(s is not None for s in given_splits):
        if any(s is None for s in given_splits):
            raise ValueError("the split column is empty for some slides; fill it for all or for none")
        _check_patients_in_one_group(samples, lambda s: s.split, "split")
        if "test" not in given_splits:
            raise ValueError("the split column names no test slides")
        test = {i for i, s in enumerate(given_splits) if s == "test"}
        val = tuple(i for i, s in enumerate(given_splits) if s == "val")
        train = tuple(i for i, s in enumerate(given_splits) if s == "train")
        if val or val_fraction <= 0:
            return [Split("0", train, val, tuple(sorted(test)))]
        test_sets = {"0": test}
    else:
        patients = Counter(s.patient_id for s in samples)
        if folds < 2:
            raise ValueError("folds must be >= 2 for cross-validation (or give a split column)")
        if len(patients) < folds:
            raise ValueError(f"{len(patients)} patients cannot fill {folds} folds")
        assignment = kfold_patients(_patient_strata(samples, strata), patients, folds=folds, seed=seed)
        test_sets = {str(k): {i for i, s in enumerate(samples) if assignment[s.patient_id] == k} for k in range(folds)}

    splits = []
    for number, (name, test) in enumerate(test_sets.items()):
        rest = [i for i in range(len(samples)) if i not in test]
        rest_samples = [samples[i] for i in rest]
        val_patients = holdout_patients(_patient_strata(rest_samples, strata[rest]), fraction=val_fraction,
                                        seed=seed * 1000 + number + 1)
        val = tuple(i for i in rest if samples[i].patient_id in val_patients)
        train = tuple(i for i in rest if samples[i].patient_id not in val_patients)
        splits.append(Split(name, train, val, tuple(sorted(test))))
    return splits
