"""Every frozen-feature protocol on one train/test split, with bootstrap CIs and a report.

:func:`evaluate_tiles` runs the linear probe, kNN, SimpleShot, few-shot episodes and
ROI retrieval on one encoder's features and returns a JSON-able document;
:func:`write_tile_report` writes the documents of one or more encoders (evaluated on
the same split) as ``eval.json``, ``eval.md`` (a table per protocol, encoders side by
side), a confusion-matrix PNG per encoder and the few-shot curves.

Notation: N training samples, M test samples, D dim, C classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscope.eval.metrics import confusion_matrices, probe_metrics
from histoscope.eval.report import evaluate

__all__ = ["PROTOCOLS", "TileEvalSettings", "TileReportPaths", "evaluate_tiles", "write_tile_report",
           "tile_report_markdown", "encoder_comparison_markdown"]

PROTOCOLS = ("linear", "knn", "simpleshot", "fewshot", "retrieval")
PROTOCOL_TITLES = {"linear": "Linear probe", "knn": "kNN", "simpleshot": "SimpleShot",
                   "fewshot": "Few-shot (SimpleShot episodes)", "retrieval": "ROI retrieval"}
SUMMARY_METRIC = "bacc"  # the headline of the comparison table and the few-shot curves


@dataclass(frozen=True)
class TileEvalSettings:
    """How the protocols run (UNI's settings by default)."""

    protocols: tuple[str, ...] = PROTOCOLS
    shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # few-shot sizes; those above a class's size are skipped
    episodes: int = 1000
    k: int = 20  # kNN neighbours
    max_iter: int = 1000  # linear-probe L-BFGS iterations
    bootstrap: int = 1000  # resamples for the 95% CIs (0: none)
    level: float = 0.95
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")


def _with_cis(metrics_fn: Callable[..., dict[str, float]], arrays: tuple, settings: TileEvalSettings) -> dict:
    return evaluate(metrics_fn, *arrays, n_bootstrap=settings.bootstrap, seed=settings.seed, level=settings.level)


def _probe_entry(result, settings: TileEvalSettings, **extra) -> dict[str, Any]:
    arrays = (result.targets, result.pred_index) + ((result.probs,) if result.probs is not None else ())
    num_classes = len(result.classes)
    return {**extra, "metrics": _with_cis(probe_metrics, arrays, settings),
            "confusion": confusion_matrices(result.targets, result.pred_index, num_classes).tolist()}


def evaluate_tiles(train_x, train_y, test_x, test_y, *, settings: TileEvalSettings = TileEvalSettings(),
                   class_names: Sequence[str] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``settings.protocols`` on one split; returns the results document.

    ``train_y``/``test_y`` are labels of any sortable kind (class names); every test
    label must occur in training; with ``class_names`` the labels are indices into it.
    Metric entries are ``{"value", "ci_low", "ci_high"}``
    (percentile bootstrap over test samples); few-shot entries are ``{"mean", "std"}``
    over episodes, as UNI reports them.
    """
    import torch

    from histoscope.eval.episodes import fewshot
    from histoscope.eval.probes import encode_labels, knn_probe, linear_probe, simpleshot
    from histoscope.utils.device import resolve_device

    log = log or (lambda message: None)
    classes, train_index, (test_index,) = encode_labels(train_y, test_y)
    device = resolve_device(settings.device)
    train_x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    test_x = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    names = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
    doc: dict[str, Any] = {"classes": names, "n_train": len(train_index),
                           "n_test": len(test_index), "dim": int(train_x.shape[1]),
                           "settings": {**asdict(settings), "protocols": list(settings.protocols)}, "protocols": {}}
    protocols = doc["protocols"]
    if "linear" in settings.protocols:
        log("linear probe")
        result = linear_probe(train_x, train_index, test_x, test_index, max_iter=settings.max_iter, device=device)
        protocols["linear"] = _probe_entry(result, settings, max_iter=settings.max_iter)
    if "knn" in settings.protocols:
        log(f"kNN (k={settings.k})")
        k = min(settings.k, len(train_index))
        protocols["knn"] = _probe_entry(knn_probe(train_x, train_index, test_x, test_index, k=k, device=device),
                                        settings, k=k)
    if "simpleshot" in settings.protocols:
        log("SimpleShot")
        protocols["simpleshot"] = _probe_entry(simpleshot(train_x, train_index, test_x, test_index, device=device),
                                               settings)
    if "fewshot" in settings.protocols:
        smallest = int(np.bincount(train_index, minlength=len(classes)).min())
        shots = [s for s in settings.shots if s <= smallest]
        entry = {"episodes": settings.episodes, "n_way": len(classes), "seed": settings.seed, "shots": {},
                 "skipped_shots": [s for s in settings.shots if s > smallest]}
        for n_shot in shots:
            log(f"few-shot: {settings.episodes} episodes of {n_shot} shot(s)")
            result = fewshot(train_x, train_index, test_x, test_index, n_shot=n_shot, n_episodes=settings.episodes,
                             seed=settings.seed, device=device)
            entry["shots"][str(n_shot)] = result.metrics
        protocols["fewshot"] = entry
    if "retrieval" in settings.protocols:
        from histoscope.eval.roi_retrieval import retrieval

        log("ROI retrieval")
        result = retrieval(train_x.numpy(), train_index, test_x.numpy(), test_index)
        names = list(result.hits)
        hits = tuple(result.hits[name].astype(np.float64) for name in names)
        protocols["retrieval"] = {"metrics": _with_cis(lambda *h: {n: float(v.mean()) for n, v in zip(names, h)},
                                                       hits, settings)}
    return doc


@dataclass(frozen=True)
class TileReportPaths:
    """Where :func:`write_tile_report` puts each output under ``out``."""

    out: Path

    @property
    def json(self) -> Path:
        return self.out / "eval.json"

    @property
    def markdown(self) -> Path:
        return self.out / "eval.md"

    @property
    def fewshot(self) -> Path:
        return self.out / "fewshot.png"

    def confusion(self, encoder: str) -> Path:
        return self.out / f"confusion_{_safe(encoder)}.png"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _cell(entry: Mapping[str, float]) -> str:
    if "mean" in entry:
        return "n/a" if entry["mean"] is None or not np.isfinite(entry["mean"]) else (
            f"{entry['mean']:.3f} ± {entry['std']:.3f}" if np.isfinite(entry["std"]) else f"{entry['mean']:.3f}")
    value, low, high = entry["value"], entry["ci_low"], entry["ci_high"]
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} ({low:.3f}–{high:.3f})" if low is not None and np.isfinite(low) else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _protocols_run(docs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [p for p in PROTOCOLS if any(p in doc["protocols"] for doc in docs.values())]


def tile_report_markdown(docs: Mapping[str, Mapping[str, Any]], *, title: str = "Tile encoder evaluation") -> str:
    """One table per protocol with every encoder as a row (``docs``: encoder -> document)."""
    first = next(iter(docs.values()))
    settings = first["settings"]
    level = int(round(settings["level"] * 100))
    lines = [f"# {title}", "",
             f"{first['n_train']} training and {first['n_test']} test samples, {len(first['classes'])} classes "
             f"({', '.join(first['classes'])}). Values with percentile bootstrap {level}% CIs over the test samples "
             f"({settings['bootstrap']} resamples); few-shot: mean ± std over {settings['episodes']} episodes. "
             "Protocols and metrics as UNI (mahmoodlab/UNI) computes them.", ""]
    for protocol in _protocols_run(docs):
        present = {name: doc["protocols"][protocol] for name, doc in docs.items() if protocol in doc["protocols"]}
        title_suffix = f" (k={next(iter(present.values())).get('k')})" if protocol == "knn" else ""
        lines += [f"## {PROTOCOL_TITLES[protocol]}{title_suffix}", ""]
        if protocol == "fewshot":
            shots = sorted({int(s) for entry in present.values() for s in entry["shots"]})
            for metric in ("bacc", "acc", "kappa", "weighted_f1"):
                rows = [[name, *(_cell(entry["shots"][str(s)][metric]) if str(s) in entry["shots"] else "–"
                                 for s in shots)] for name, entry in present.items()]
                lines += [f"{metric} by shots per class:", "", *_table(["encoder", *map(str, shots)], rows), ""]
            continue
        metrics = list(next(iter(present.values()))["metrics"])
        rows = [[name, *(_cell(entry["metrics"][m]) for m in metrics)] for name, entry in present.items()]
        lines += [*_table(["encoder", *metrics], rows), ""]
    return "\n".join(lines)


def _headline(doc: Mapping[str, Any], protocol: str) -> tuple[str, str]:
    entry = doc["protocols"].get(protocol)
    if protocol == "fewshot":
        shots = sorted(int(s) for s in (entry or {}).get("shots", {}))
        if not shots:
            return "few-shot", "–"
        return f"{shots[-1]}-shot {SUMMARY_METRIC}", _cell(entry["shots"][str(shots[-1])][SUMMARY_METRIC])
    if protocol == "retrieval":
        if entry is None:
            return "retrieval", "–"
        return "retrieval " + ", ".join(entry["metrics"]), " / ".join(
            f"{m['value']:.3f}" for m in entry["metrics"].values())
    return f"{protocol} {SUMMARY_METRIC}", _cell(entry["metrics"][SUMMARY_METRIC]) if entry else "–"


def encoder_comparison_markdown(docs: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per encoder, one headline column per protocol."""
    protocols = _protocols_run(docs)
    header = ["encoder"]
    rows = []
    for name, doc in docs.items():
        cells = [_headline(doc, p) for p in protocols]
        if len(header) == 1:
            header += [title for title, _ in cells]
        rows.append([name, *(cell for _, cell in cells)])
    return "\n".join(_table(header, rows)) + "\n"


def write_tile_report(docs: Mapping[str, Mapping[str, Any]], out: str | Path, *,
                      extra: Mapping[str, Any] | None = None) -> TileReportPaths:
    """``eval.json``, ``eval.md``, ``confusion_<encoder>.png`` and ``fewshot.png`` under ``out``."""
    from histoscope.eval.plots import plot_confusion, plot_fewshot_curves
    from histoscope.io.atomic import atomic_path, json_safe, write_json

    paths = TileReportPaths(Path(out))
    write_json(paths.json, json_safe({**(extra or {}), "encoders": dict(docs)}))
    with atomic_path(paths.markdown) as tmp:
        tmp.write_text(tile_report_markdown(docs) + "\n## Comparison\n\n" + encoder_comparison_markdown(docs))
    for name, doc in docs.items():
        probe = next((doc["protocols"][p] for p in ("linear", "knn", "simpleshot") if p in doc["protocols"]), None)
        if probe is not None:
            which = next(p for p in ("linear", "knn", "simpleshot") if p in doc["protocols"])
            plot_confusion(np.asarray(probe["confusion"]), doc["classes"], paths.confusion(name),
                           title=f"{name}: {PROTOCOL_TITLES[which]}")
    curves = {name: doc["protocols"]["fewshot"]["shots"] for name, doc in docs.items()
              if doc["protocols"].get("fewshot", {}).get("shots")}
    if curves:
        plot_fewshot_curves(curves, paths.fewshot, metric=SUMMARY_METRIC)
    return paths
