"""``histoscope train``: cross-validated training from a slide table and a features folder.

Output folder::

    OUT/config.yaml          the recipe as run (a rerun with another recipe refuses)
    OUT/splits.csv           slide, patient and role (train/val/test) in every fold
    OUT/fold_k/checkpoint.pt best model of fold k (loads with load_slide_model / predict)
    OUT/fold_k/predictions.csv  out-of-fold predictions on fold k's test slides
    OUT/fold_k/history.json  per-epoch losses and validation metrics
    OUT/results.json, results.md  per-fold and pooled metrics with bootstrap 95% CIs
    OUT/roc.png | km.png | regression.png

A fold is finished when ``fold_k/fold_done.json`` exists; until then
``fold_k/train_state.pt`` holds its latest epoch and a rerun continues from there.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.eval.plots import plot_kaplan_meier, plot_regression, plot_roc
from histoscope.eval.report import evaluate, results_markdown, summarise
from histoscope.io.atomic import atomic_path, json_safe, write_json
from histoscope.slide import load_slide_model
from histoscope.train.checkpoint import resolved_arch, save_checkpoint
from histoscope.train.config import ConfigError, TrainConfig
from histoscope.train.data import BagDataset, FeatureCache, features_dim, features_tile_size, read_table
from histoscope.train.loop import derived_seed, fit, predict_bags
from histoscope.train.splits import make_splits
from histoscope.train.tasks import Task, make_task
from histoscope.utils.device import resolve_device, resolve_dtype

__all__ = ["train", "write_columns", "read_columns", "precision_dtype"]

# Settings that cannot change what a run computes, so a resumed run may differ in them.
_RESUME_FREE = {"device", "out_dir", "cache_gb", "bootstrap"}


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    return resolve_dtype(None if precision == "auto" else precision, device)


def write_columns(path: str | Path, columns: dict[str, Any]) -> None:
    """A CSV of equal-length columns; floats written with full precision (``repr``)."""
    names = list(columns)
    rows = zip(*[list(columns[n]) for n in names])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])


def read_columns(path: str | Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}


def _check_config(out: Path, config: TrainConfig, overwrite: bool) -> None:
    import yaml

    path = out / "config.yaml"
    if path.exists() and not overwrite and any(out.glob("fold_*")):  # earlier work this run would build on
        previous = yaml.safe_load(path.read_text()) or {}
        current = config.to_dict()
        changed = sorted(k for k in set(previous) | set(current)
                         if k not in _RESUME_FREE and previous.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{out} holds a run with a different recipe (differs in {', '.join(changed)}); "
                              "use another out_dir, or --overwrite to start afresh")
    if overwrite:
        for child in out.glob("fold_*"):
            shutil.rmtree(child)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _plots(out: Path, task: Task, columns: dict[str, Any], arrays: tuple) -> list[str]:
    if task.kind == "classification":
        return [str(plot_roc(arrays[0], arrays[1], task.class_names, out / "roc.png", title="ROC (pooled folds)"))]
    if task.kind == "survival":
        return [str(plot_kaplan_meier(*arrays, out / "km.png", title="Kaplan–Meier (pooled folds)"))]
    return [str(plot_regression(*arrays, out / "regression.png"))]


def train(config: TrainConfig, *, overwrite: bool = False, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train and evaluate every fold a recipe describes; returns the results document.

    Reruns into the same ``out_dir`` skip finished folds and resume an interrupted one
    from its last epoch, ending with the same predictions as an uninterrupted run.

    Examples
    --------
    >>> from histoscope.train import load_recipe, train                          # doctest: +SKIP
    >>> results = train(load_recipe("recipes/abmil_classification.yaml", ["epochs=10"]))  # doctest: +SKIP
    >>> results["pooled"]["metrics"]["auroc"]["value"]                            # doctest: +SKIP
    """
    config.validate()
    log = log or (lambda message: None)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config, overwrite)

    samples = read_table(config.csv, task=config.task, label_column=config.label_column)
    features_dir = Path(config.features_dir)
    paths = [features_dir / f"{s.slide_id}.h5" for s in samples]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{features_dir}: {len(missing)} of {len(paths)} slides have no features file "
                                f"(e.g. {', '.join(missing[:5])})")
    in_dim = features_dim(paths[0])
    base_task = make_task(config, samples)
    splits = make_splits(samples, base_task.strata(samples), folds=config.folds, val_fraction=config.val_fraction,
                         seed=config.seed)
    roles = {"slide_id": [], "patient_id": [], "fold": [], "role": []}
    for split in splits:
        for role in ("train", "val", "test"):
            for i in getattr(split, role):
                for key, value in zip(roles, (samples[i].slide_id, samples[i].patient_id, split.fold, role)):
                    roles[key].append(value)
    write_columns(out / "splits.csv", roles)

    device = resolve_device(config.device)
    dtype = precision_dtype(config.precision, device)
    dataset = BagDataset(paths, FeatureCache(int(config.cache_gb * 2**30)), max_tiles=config.max_tiles)
    arch = resolved_arch(config.model, tiny=config.tiny, model_args=config.model_args)
    if "tile_size" in arch and "tile_size" not in config.model_args:
        # Position-aware models (LongNet, HIPT) index tiles on their level-0 grid: 0.5 µm/px
        # tiles cut from a 0.25 µm/px scan step by 512, not by the 256 of their pixels.
        tile_size = features_tile_size(paths[0])
        if tile_size is not None:
            arch["tile_size"] = tile_size
    log(f"{len(samples)} slides, {len({s.patient_id for s in samples})} patients, {len(splits)} folds, "
        f"D={in_dim}, model {config.model}, device {device}, {dtype}")

    fold_results = []
    for number, split in enumerate(splits):
        fold_dir = out / f"fold_{split.fold}"
        done = fold_dir / "fold_done.json"
        if not done.exists():
            _run_fold(config, split, number, samples, dataset, in_dim, arch, device, dtype, fold_dir, log,
                      on_epoch_end)
        fold_results.append(json.loads(done.read_text()))
    return _summarise(out, config, base_task, fold_results)


def _run_fold(config, split, number, samples, dataset, in_dim, arch, device, dtype, fold_dir: Path, log,
              on_epoch_end) -> None:
    fold_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(config, samples)
    task.fit([samples[i] for i in split.train])
    torch.manual_seed(derived_seed(config.seed, number))  # the same initial weights on every rerun
    model = load_slide_model(config.model, in_dim=in_dim, num_outputs=task.num_outputs, **arch).to(device)
    state_path = fold_dir / "train_state.pt"
    result = fit(model=model, task=task, dataset=dataset, train_indices=list(split.train),
                 val_indices=list(split.val), samples=samples, config=config, fold_number=number,
                 fold_name=split.fold, device=device, dtype=dtype, state_path=state_path, log=log,
                 on_epoch_end=on_epoch_end)
    model.load_state_dict(result.best_state)
    if task.calibrates:
        train_logits, _ = predict_bags(model, dataset, list(split.train), batch_size=config.batch_size,
                                       device=device, dtype=dtype)
        task.calibrate(train_logits)

    test = list(split.test)
    logits, _ = predict_bags(model, dataset, test, batch_size=config.batch_size, device=device, dtype=dtype)
    test_samples = [samples[i] for i in test]
    columns = {"slide_id": [s.slide_id for s in test_samples], "patient_id": [s.patient_id for s in test_samples],
               "fold": [split.fold] * len(test), **task.truth_columns(test_samples), **task.output_columns(logits)}
    write_columns(fold_dir / "predictions.csv", columns)
    save_checkpoint(fold_dir / "checkpoint.pt", model=model, model_name=config.model, arch=arch, in_dim=in_dim,
                    task=task, extra={"tiny": config.tiny, "fold": split.fold, "best_epoch": result.best_epoch,
                                      "config": config.to_dict()})
    write_json(fold_dir / "history.json", result.history)
    write_json(fold_dir / "fold_done.json", {"fold": split.fold, "best_epoch": result.best_epoch,
                                             "epochs_run": len(result.history), "n_train": len(split.train),
                                             "n_val": len(split.val), "n_test": len(test)})
    state_path.unlink(missing_ok=True)


def _summarise(out: Path, config: TrainConfig, task: Task, fold_results: list[dict[str, Any]]) -> dict[str, Any]:
    folds, pooled_columns = [], {}
    for info in fold_results:
        columns = read_columns(out / f"fold_{info['fold']}" / "predictions.csv")
        for name, values in columns.items():
            pooled_columns.setdefault(name, []).extend(values)
        metrics, arrays, strata = task.metric_inputs(columns)
        folds.append({**info, "n": len(columns["slide_id"]),
                      "metrics": evaluate(metrics, *arrays, strata=strata, n_bootstrap=config.bootstrap,
                                          seed=config.seed)})
    metrics, arrays, strata = task.metric_inputs(pooled_columns)
    pooled = {"n": len(pooled_columns["slide_id"]),
              "metrics": evaluate(metrics, *arrays, strata=strata, n_bootstrap=config.bootstrap, seed=config.seed)}
    results = summarise(task=config.task, folds=folds, pooled=pooled,
                        bootstrap={"n": config.bootstrap, "level": 0.95, "seed": config.seed, "method": "percentile"})
    results["model"] = config.model
    if task.kind == "classification":
        results["class_names"] = task.class_names
    results["plots"] = _plots(out, task, pooled_columns, arrays)
    write_json(out / "results.json", json_safe(results))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results, title=f"{config.model} · {config.task}"))
    return results
