"""``histoscope train``: cross-validated training from a slide table and a features folder.

Output folder::

    OUT/config.yaml          the recipe as run (a rerun with another recipe refuses)
    OUT/splits.csv           slide, patient and role (train/val/test) in every fold
    OUT/fold_k/checkpoint.pt best model of fold k (loads with load_slide_model / predict)
    OUT/fold_k/predictions.csv  out-of-fold predictions on fold k's test slides
    OUT/fold_k/history.json  per-epoch losses and validation metrics
    OUT/results.json, results.md  per-fold and pooled metrics with bootstrap 95% CIs
    OUT/final/checkpoint.pt  with ``final: true``: one model trained on every slide (for predict)
    OUT/roc.png | km.png | regression.png

A fold is finished when ``fold_k/fold_done.json`` exists; until then
``fold_k/train_state.pt`` holds its latest epoch and a rerun continues from there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.eval.plots import plot_kaplan_meier, plot_regression, plot_roc
from histoscope.eval.report import evaluate, results_markdown, summarise
from histoscope.io.atomic import atomic_path, json_safe, write_json
from histoscope.io.columns import read_columns, write_columns
from histoscope.io.features_h5 import check_features, features_path
from histoscope.io.outdir import output_folder
from histoscope.pipeline.executors import Executor
from histoscope.slide import get_slide_model_spec, load_slide_model
from histoscope.slide.trained import save_trained_model
from histoscope.train.checkpoint import resolved_arch
from histoscope.train.config import TrainConfig, record_recipe
from histoscope.train.data import BagDataset, FeatureCache, Sample, features_geometry, read_table
from histoscope.train.loop import derived_seed, fit, predict_bags
from histoscope.train.optim import freeze_encoder
from histoscope.train.splits import Split, make_splits
from histoscope.train.tasks import Task, make_task
from histoscope.utils.device import resolve_device, resolve_dtype

__all__ = ["train", "final_dir", "final_epochs", "fold_dir", "results_path", "small_data_warnings"]

# Fewer validation slides than this make early stopping a coin toss (warned about).
MIN_VALIDATION_SLIDES = 10

# Settings that cannot change what a run computes, so a resumed run may differ in them.
_RESUME_FREE = {"device", "out_dir", "cache_gb", "bootstrap", "final"}


def fold_dir(out_dir: str | Path, fold: str) -> Path:
    """``OUT/fold_<k>``: one fold's checkpoint, predictions and history."""
    return Path(out_dir) / f"fold_{fold}"


def final_dir(out_dir: str | Path) -> Path:
    """``OUT/final``: the model trained on every slide (recipe key ``final: true``)."""
    return Path(out_dir) / "final"


def results_path(out_dir: str | Path, suffix: str = ".md") -> Path:
    """``OUT/results.md`` (or ``.json``): the run's per-fold and pooled metrics."""
    return (Path(out_dir) / "results").with_suffix(suffix)


def _check_config(out: Path, config: TrainConfig, overwrite: bool) -> None:
    resume = not overwrite and any(out.glob("fold_*"))  # earlier work this run would build on
    if overwrite:
        for child in [*out.glob("fold_*"), final_dir(out)]:
            if child.is_dir():
                shutil.rmtree(child)
    record_recipe(out, config, resume=resume, resume_free=_RESUME_FREE)


def _plots(out: Path, task: Task, columns: dict[str, Any], arrays: tuple) -> list[str]:
    if task.kind == "classification":
        return [str(plot_roc(arrays[0], arrays[1], task.class_names, out / "roc.png", title="ROC (pooled folds)"))]
    if task.kind == "survival":
        return [str(plot_kaplan_meier(*arrays, out / "km.png", title="Kaplan–Meier (pooled folds)"))]
    return [str(plot_regression(*arrays, out / "regression.png"))]


def train(config: TrainConfig, *, overwrite: bool = False, log: Callable[[str], None] | None = None,
          on_epoch_end: Callable[..., None] | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Train and evaluate every fold a recipe describes; returns the results document.

    Reruns into the same ``out_dir`` skip finished folds and resume an interrupted one
    from its last epoch, ending with the same predictions as an uninterrupted run.
    With an ``executor`` (a ``RayExecutor``, or a ``LocalExecutor`` of several processes)
    the unfinished folds train in parallel, one job each, with the same results: a fold's
    initial weights and data order follow from the seed and its number alone. Per-epoch
    lines and ``on_epoch_end`` are for the sequential run only; the ``final`` model
    trains after the folds, in this process.

    Examples
    --------
    >>> from histoscope.train import load_recipe, train                          # doctest: +SKIP
    >>> results = train(load_recipe("abmil_classification", ["epochs=10"]))  # doctest: +SKIP
    >>> results["pooled"]["metrics"]["auroc"]["value"]                            # doctest: +SKIP
    """
    config.validate()
    log = log or (lambda message: None)
    out = Path(config.out_dir)

    # Everything the run reads is checked before anything is written.
    samples = read_table(config.csv, task=config.task, label_column=config.label_column)
    features_dir = Path(config.features_dir)
    paths = [features_path(features_dir, s.slide_id) for s in samples]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{features_dir}: {len(missing)} of {len(paths)} slides have no features file "
                                f"(e.g. {', '.join(missing[:5])}); a slide_id is its features file's name without "
                                ".h5, and features_dir the embed output's features_<encoder> folder")
    in_dim = _check_bags(paths)
    if config.init_weights and not Path(config.init_weights).is_file():
        raise FileNotFoundError(f"{config.init_weights}: no such checkpoint file (init_weights)")
    arch = resolved_arch(config.model, tiny=config.tiny, model_args=config.model_args)
    base_task = make_task(config, samples)
    splits = make_splits(samples, base_task.strata(samples), folds=config.folds, val_fraction=config.val_fraction,
                         seed=config.seed)
    device = resolve_device(config.device, option="device (--device)")
    dtype = resolve_dtype(config.precision, device)
    warnings = small_data_warnings(config, samples, splits)
    geometry = features_geometry(paths[0])
    if "tile_size" in arch and "tile_size" not in config.model_args and geometry is not None:
        # Position-aware models (LongNet, HIPT) index tiles on their level-0 grid: 0.5 µm/px
        # tiles cut from a 0.25 µm/px scan step by 512, not by the 256 of their pixels.
        arch["tile_size"] = geometry.size_level0

    with output_folder(out):
        _check_config(out, config, overwrite)
        for warning in warnings:  # once the output folder is known to be usable
            log(f"warning: {warning}")
        roles = {"slide_id": [], "patient_id": [], "fold": [], "role": []}
        for split in splits:
            for role in ("train", "val", "test"):
                for i in getattr(split, role):
                    for key, value in zip(roles, (samples[i].slide_id, samples[i].patient_id, split.fold, role)):
                        roles[key].append(value)
        write_columns(out / "splits.csv", roles)
        dataset = BagDataset(paths, FeatureCache(int(config.cache_gb * 2**30)), max_tiles=config.max_tiles)
        log(f"{len(samples)} slides, {len({s.patient_id for s in samples})} patients, {len(splits)} folds, "
            f"D={in_dim}, model {config.model}, device {device}, {dtype}")

        run = _Cohort(config, samples, dataset, in_dim, arch, device, dtype, log, on_epoch_end)

        def done(split: Split) -> Path:
            return fold_dir(out, split.fold) / "fold_done.json"

        pending = [(number, split) for number, split in enumerate(splits) if not done(split).exists()]
        if executor is None:
            for number, split in pending:
                _run_fold(run, split, number, fold_dir(out, split.fold))
        elif pending:
            # the job carries the cohort without what cannot travel (the open feature cache, callbacks)
            job = functools.partial(_fold_job, run=dataclasses.replace(run, dataset=None, log=None, on_epoch_end=None),
                                    paths=paths, out=out)
            for index, error in executor.map(job, pending):
                if isinstance(error, BaseException):
                    raise error
                log(f"fold {pending[index][1].fold} done")
        fold_results = [json.loads(done(split).read_text()) for split in splits]
        results = _summarise(out, config, base_task, fold_results, warnings)
        if config.final:
            results["final"] = _run_final(run, fold_results, len(splits), final_dir(out))
            write_json(results_path(out, ".json"), json_safe(results))
    return results


def _check_bags(paths: list[Path]) -> int:
    """D of a cohort's features files, after checking every one: readable, with tiles and
    their coordinates, finite, all of one dim (:func:`~histoscope.io.features_h5.check_features`)."""
    dim = None
    for path in paths:
        _, dim = check_features(path, dim=dim)
    return dim


@dataclass
class _Cohort:
    """What every model of one run is trained from."""

    config: TrainConfig
    samples: list[Sample]
    dataset: BagDataset | None  # None while it travels to an executor's process
    in_dim: int
    arch: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    log: Callable[[str], None] | None
    on_epoch_end: Callable[..., None] | None


def _fold_job(fold: tuple[int, Split], *, run: _Cohort, paths: list[Path], out: Path) -> None:
    """One fold in a process of its own (an executor's job): its own feature cache, no log lines."""
    number, split = fold
    config = run.config
    dataset = BagDataset(paths, FeatureCache(int(config.cache_gb * 2**30)), max_tiles=config.max_tiles)
    run = dataclasses.replace(run, dataset=dataset, log=lambda message: None, on_epoch_end=None)
    _run_fold(run, split, number, fold_dir(out, split.fold))


def _train_model(run: _Cohort, config: TrainConfig, *, number: int, name: str, train: list[int], val: list[int],
                 folder: Path):
    """``(model with its best weights, fitted task, fit result)`` trained on rows ``train``,
    early-stopping on ``val``; resumes from ``folder/train_state.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    task = make_task(config, run.samples)
    task.fit([run.samples[i] for i in train])
    torch.manual_seed(derived_seed(config.seed, number))  # the same initial weights on every rerun
    model = load_slide_model(config.model, in_dim=run.in_dim, num_outputs=task.num_outputs,
                             weights=config.init_weights, new_head=config.new_head, **run.arch)
    if config.freeze_encoder:
        freeze_encoder(model, get_slide_model_spec(config.model))
    model = model.to(run.device)
    result = fit(model=model, task=task, dataset=run.dataset, train_indices=train, val_indices=val,
                 samples=run.samples, config=config, fold_number=number, fold_name=name, device=run.device,
                 dtype=run.dtype, state_path=folder / "train_state.pt", log=run.log, on_epoch_end=run.on_epoch_end)
    model.load_state_dict(result.best_state)
    if task.calibrates:
        train_logits, _ = predict_bags(model, run.dataset, train, batch_size=config.batch_size, device=run.device,
                                       dtype=run.dtype)
        task.calibrate(train_logits)
    return model, task, result


def _save_model(run: _Cohort, folder: Path, model, task: Task, extra: dict[str, Any]) -> None:
    save_trained_model(folder / "checkpoint.pt", model=model, model_name=run.config.model, arch=run.arch,
                       in_dim=run.in_dim, outputs=task.outputs,
                       extra={"tiny": run.config.tiny, **extra, "config": run.config.to_dict()})


def _run_fold(run: _Cohort, split: Split, number: int, folder: Path) -> None:
    config, samples = run.config, run.samples
    model, task, result = _train_model(run, config, number=number, name=split.fold, train=list(split.train),
                                       val=list(split.val), folder=folder)
    test = list(split.test)
    logits, _ = predict_bags(model, run.dataset, test, batch_size=config.batch_size, device=run.device,
                             dtype=run.dtype)
    test_samples = [samples[i] for i in test]
    columns = {"slide_id": [s.slide_id for s in test_samples], "patient_id": [s.patient_id for s in test_samples],
               "fold": [split.fold] * len(test), **task.truth_columns(test_samples), **task.output_columns(logits)}
    write_columns(folder / "predictions.csv", columns)
    _save_model(run, folder, model, task, {"fold": split.fold, "best_epoch": result.best_epoch})
    write_json(folder / "history.json", json_safe(result.history))
    write_json(folder / "fold_done.json", {"fold": split.fold, "best_epoch": result.best_epoch,
                                             "epochs_run": len(result.history), "n_train": len(split.train),
                                             "n_val": len(split.val), "n_test": len(test)})
    (folder / "train_state.pt").unlink(missing_ok=True)


def final_epochs(fold_results: list[dict[str, Any]]) -> int:
    """Epochs for the final model: the median over folds of the epochs that gave each fold's
    best validation result (with no slides left to validate on, it cannot stop early)."""
    return max(1, int(np.ceil(np.median([info["best_epoch"] + 1 for info in fold_results]))))


def _run_final(run: _Cohort, fold_results: list[dict[str, Any]], number: int, folder: Path) -> dict[str, Any]:
    """``OUT/final/checkpoint.pt``: one model trained on every slide, the one to ``predict`` with."""
    done = folder / "final_done.json"
    if not done.exists():
        epochs = final_epochs(fold_results)
        run.log(f"final model: all {len(run.samples)} slides, {epochs} epochs (median best epoch of the folds)")
        config = dataclasses.replace(run.config, epochs=epochs)
        model, task, result = _train_model(run, config, number=number, name="final",
                                           train=list(range(len(run.samples))), val=[], folder=folder)
        _save_model(run, folder, model, task, {"fold": "final", "epochs": epochs})
        write_json(folder / "history.json", json_safe(result.history))
        write_json(done, {"checkpoint": str(folder / "checkpoint.pt"), "epochs": epochs, "n_train": len(run.samples)})
        (folder / "train_state.pt").unlink(missing_ok=True)
    return json.loads(done.read_text())


def small_data_warnings(config: TrainConfig, samples: list[Sample], splits: list[Split]) -> list[str]:
    """What the folds cannot show because the cohort is too small for them: empty validation
    sets (no early stopping) and metrics no model could define on a fold's test slides (n/a)."""
    probe = make_task(config, samples)
    probe.fit(samples)
    warnings = []
    for split in splits:
        if not split.val and config.val_fraction > 0:
            patients = len({samples[i].patient_id for i in split.train})
            warnings.append(f"fold {split.fold}: no validation slides ({patients} training patients are too few for "
                            f"val_fraction={config.val_fraction:g}); it trains all {config.epochs} epochs without "
                            "early stopping")
        elif 0 < len(split.val) < MIN_VALIDATION_SLIDES:
            warnings.append(f"fold {split.fold}: only {len(split.val)} validation slides, so early stopping follows "
                            f"noise (an AUROC of {len(split.val)} slides takes a few values only); with a small "
                            "cohort set val_fraction=0 and a fixed number of epochs")
        undefined = probe.undefined_metrics([samples[i] for i in split.test])
        if undefined:
            warnings.append(f"fold {split.fold}: {', '.join(undefined)} cannot be computed on its {len(split.test)} "
                            "test slides (too few, or one class) and are reported as n/a; use fewer folds or more slides")
    return warnings


def _summarise(out: Path, config: TrainConfig, task: Task, fold_results: list[dict[str, Any]],
               warnings: list[str]) -> dict[str, Any]:
    folds, pooled_columns = [], {}
    for info in fold_results:
        columns = read_columns(fold_dir(out, info["fold"]) / "predictions.csv")
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
    results["warnings"] = warnings
    if task.kind == "classification":
        results["class_names"] = task.class_names
    results["plots"] = _plots(out, task, pooled_columns, arrays)
    write_json(results_path(out, ".json"), json_safe(results))
    with atomic_path(results_path(out)) as tmp:
        tmp.write_text(results_markdown(results, title=f"{config.model} · {config.task}"))
    return results
