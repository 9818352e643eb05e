"""``histoscope train-report``: HistoGPT's two training stages on a lab's slides and reports.

Stage 1 trains the Perceiver resampler as a MIL classifier of the slides' ``label``
with ``histoscope train``'s trainer (slide model ``perceiver``, whose ``resampler.*``
keys are HistoGPT's). Stage 2 trains the report model by teacher forcing: the loss is
the next-token cross-entropy on the report tokens only, after the prompt; one
paraphrase per slide and epoch. As published, stage 2 trains the gated
cross-attention blocks and the exit gate, with the resampler (from stage 1) and the
language model frozen; ``train_resampler`` / ``train_lm`` unfreeze them.

Output folder::

    OUT/config.yaml     the recipe as run (a rerun with another recipe refuses)
    OUT/splits.csv      slide_id, patient_id, split (train/val/test)
    OUT/tokenizer/      the tokenizer (given, the LM folder's, or a BPE trained on the training reports)
    OUT/stage1/         stage 1 as a ``histoscope train`` run (when the table has labels)
    OUT/model.pt        the model with the lowest validation loss (histoscope report OUT)
    OUT/history.json    per-epoch training and validation loss
    OUT/train_state.pt  while unfinished: the last epoch's state; a rerun resumes from it

Exact resumption: initial weights come from ``seed``, each epoch's slide order,
paraphrases and tile subsets from ``(seed, epoch)``, and torch's generator is
reseeded every epoch.

Notation: B slides per batch, N tiles, D feature dim, T tokens.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.io.atomic import write_json
from histoscope.io.checkpoint import read_checkpoint
from histoscope.io.columns import write_columns
from histoscope.io.features_h5 import check_features, features_path
from histoscope.io.outdir import output_folder
from histoscope.language.registry import get_report_model_spec, load_report_model
from histoscope.language.report_text import (load_report_tokenizer, prompt_ids, report_ids, token_config,
                                             train_report_tokenizer)
from histoscope.language.trained_report import report_model_path, report_tokenizer_path, save_report_model
from histoscope.slide.bags import collate_bags
from histoscope.train.config import ConfigError, TrainConfig, record_recipe
from histoscope.train.data import BagDataset, FeatureCache
from histoscope.train.loop import AdamWSchedule, EarlyStopping, close_epoch, derived_seed, resume_fit
from histoscope.train.report.config import ReportConfig
from histoscope.train.report.data import ReportSlide, assign_roles, draw_paraphrase, read_reports, token_batch
from histoscope.train.run import fold_dir
from histoscope.train.run import train as train_slide_model
from histoscope.utils.device import autocast, resolve_device, resolve_dtype
from histoscope.utils.progress import StepProgress

__all__ = ["train_report", "report_splits_path", "trainable_parameters"]

_RESUME_FREE = {"device", "out_dir", "cache_gb"}


def report_splits_path(run_dir: str | Path) -> Path:
    """``OUT/splits.csv``: every slide's role in a train-report run."""
    return Path(run_dir) / "splits.csv"


def _check_run(out: Path, config: ReportConfig, overwrite: bool) -> None:
    if overwrite:
        for name in ("train_state.pt", "model.pt", "history.json", "splits.csv"):
            (out / name).unlink(missing_ok=True)
        for folder in (report_tokenizer_path(out), out / "stage1"):
            shutil.rmtree(folder, ignore_errors=True)
    started = any(p.exists() for p in (out / "train_state.pt", report_model_path(out), report_tokenizer_path(out),
                                       out / "stage1"))
    record_recipe(out, config, resume=started, resume_free=_RESUME_FREE)


def _tokenizer(config: ReportConfig, out: Path, texts: list[str], log):
    folder = report_tokenizer_path(out)
    if folder.is_dir():  # a resumed run keeps its tokenizer
        return load_report_tokenizer(folder)
    source = config.tokenizer or config.lm_path
    if source is not None:
        tokenizer = load_report_tokenizer(source)
    else:
        tokenizer = train_report_tokenizer([config.prompt, *texts], vocab_size=config.vocab_size)
        log(f"trained a byte-level BPE tokenizer on {len(texts)} training reports: {len(tokenizer)} tokens")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    partial.rename(folder)
    return tokenizer


def _resampler_config(resampler) -> dict[str, int]:
    """The reference's resampler fields of a built resampler."""
    attention = resampler.layers[0][0]
    return {"dim_feats": resampler.linear.in_features, "dim_model": resampler.latents.shape[-1],
            "dim_head": attention.to_q.out_features // attention.heads, "num_heads": attention.heads,
            "num_layers": len(resampler.layers), "num_latents": resampler.latents.shape[0]}


def _lm_config(model) -> dict[str, Any]:
    """The ``BioGptConfig`` fields of a built model."""
    from transformers import BioGptConfig

    known = set(BioGptConfig().to_dict())
    return {k: v for k, v in model.config.to_dict().items() if k in known and not k.startswith("_")}


def _build_model(config: ReportConfig, tokenizer, dim: int, log):
    """The report model to train: from ``weights``, or built from the configs with the
    tokenizer's vocabulary and the features' dim (and ``lm_path``'s weights)."""
    if config.weights:
        return load_report_model(config.model, weights=config.weights, lm_config=config.lm_config or None,
                                 resampler_config=config.resampler_config or None)
    spec = get_report_model_spec(config.model)
    lm = {**spec.lm_config, **(spec.tiny[0] if config.tiny else {})}
    resampler = {**spec.resampler_config, **(spec.tiny[1] if config.tiny else {}), "dim_feats": dim}
    biogpt = None
    if config.lm_path:
        from transformers import BioGptForCausalLM

        biogpt = BioGptForCausalLM.from_pretrained(config.lm_path, local_files_only=True)
        lm.update(_lm_config(biogpt))
    lm.update(token_config(tokenizer) if biogpt is None else {})
    lm.update(config.lm_config)
    resampler.update(config.resampler_config)
    model = load_report_model(config.model, lm_config=lm, resampler_config=resampler)
    if biogpt is not None:
        model.load_biogpt_state_dict(biogpt.state_dict())
        log(f"language model weights from {config.lm_path}")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                          f"{model.config.vocab_size}; use the language model's own tokenizer")
    return model


def trainable_parameters(model, *, train_resampler: bool, train_lm: bool) -> list[str]:
    """Set ``requires_grad`` as stage 2 trains: the cross-attention blocks and the exit
    gate always, the resampler and the decoder's own weights on request; returns the
    names of the trained parameters."""
    always = {id(p) for layer in model.fusion_layers for p in layer.block.parameters()}
    always |= {id(p) for p in model.exit_gate.parameters()}
    resampler = {id(p) for p in model.resampler.parameters()}
    trained = []
    for name, parameter in model.named_parameters():
        if id(parameter) in always:
            on = True
        elif id(parameter) in resampler:
            on = train_resampler
        else:
            on = train_lm
        parameter.requires_grad_(on)
        if on:
            trained.append(name)
    return trained


def _stage1(config: ReportConfig, out: Path, slides: list[ReportSlide], roles: list[str], model, log):
    """Train the resampler as a MIL classifier (``histoscope train``, slide model
    ``perceiver``) and load it into ``model``; returns the stage-1 results."""
    folder = out / "stage1"
    folder.mkdir(exist_ok=True)
    table = folder / "slides.csv"
    # the slide trainer reports on a test set; without held-out slides it tests on the validation ones
    split = roles if "test" in roles else ["test" if r == "val" else r for r in roles]
    write_columns(table, {"slide_id": [s.slide_id for s in slides], "patient_id": [s.patient_id for s in slides],
                          "label": [s.label for s in slides], "split": split})
    rs = _resampler_config(model.resampler)
    model_args = {"dim": rs["dim_model"], "depth": rs["num_layers"], "num_latents": rs["num_latents"],
                  "dim_head": rs["dim_head"], "heads": rs["num_heads"], "ff_mult": 4}
    s1 = config.stage1
    train_config = TrainConfig(task="classification", csv=str(table), features_dir=config.features_dir,
                               out_dir=str(folder / "run"), model="perceiver", model_args=model_args,
                               epochs=s1.epochs, lr=s1.lr, weight_decay=s1.weight_decay, batch_size=s1.batch_size,
                               patience=s1.patience, max_tiles=s1.max_tiles, bootstrap=s1.bootstrap,
                               val_fraction=config.val_fraction or 0.1, seed=config.seed, device=config.device,
                               precision=config.precision, cache_gb=config.cache_gb)
    log("stage 1: the resampler as a MIL classifier of the labels (histoscope train, model perceiver)")
    results = train_slide_model(train_config, log=lambda message: log(f"stage 1: {message}"))
    checkpoint = read_checkpoint(fold_dir(train_config.out_dir, results["folds"][0]["fold"]) / "checkpoint.pt",
                                 kind="trained")
    prefix = "resampler."
    model.resampler.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                     if k.startswith(prefix)}, strict=True)
    return results


class _Batches:
    """Teacher-forcing batches of slides: padded features and token rows."""

    def __init__(self, slides: list[ReportSlide], indices: list[int], dataset: BagDataset, tokenizer,
                 config: ReportConfig):
        self.slides, self.indices, self.dataset, self.config = slides, indices, dataset, config
        self.prompt = prompt_ids(tokenizer, config.prompt)
        self.pad = int(tokenizer.pad_token_id)
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.config.batch_size)

    def _report(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = report_ids(self.tokenizer, text)
        return self._ids[text]

    def __call__(self, epoch: int | None):
        """Batches of one training epoch (seeded order, paraphrases, tile subsets), or with
        ``epoch=None`` the slides in order with their first paraphrase (validation)."""
        order = (np.arange(len(self.indices)) if epoch is None
                 else np.random.default_rng([self.config.seed, epoch]).permutation(len(self.indices)))
        seed = None if epoch is None else (self.config.seed, epoch)
        for start in range(0, len(order), self.config.batch_size):
            chosen = [self.indices[p] for p in order[start:start + self.config.batch_size]]
            features, _, mask = collate_bags([self.dataset.bag(i, subsample_seed=seed) for i in chosen])
            texts = [self.slides[i].reports[0] if epoch is None
                     else draw_paraphrase(self.slides[i], seed=self.config.seed, epoch=epoch, index=i) for i in chosen]
            ids, attention, labels = token_batch(self.prompt, [self._report(t) for t in texts], pad_token_id=self.pad,
                                                 max_report_tokens=self.config.max_report_tokens)
            yield features, mask, ids, attention, labels


def _loss(model, batch, device, dtype) -> torch.Tensor:
    features, mask, ids, attention, labels = (t.to(device) for t in batch)
    with autocast(device, dtype):
        return model(ids, features, mask, attention_mask=attention, labels=labels).loss


@torch.no_grad()
def _validate(model, batches: _Batches, device, dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches(None):
        tokens = int((batch[4][:, 1:] != -100).sum())
        total += float(_loss(model, batch, device, dtype)) * tokens
        count += tokens
    return total / max(count, 1)


def train_report(config: ReportConfig, *, overwrite: bool = False, log: Callable[[str], None] | None = None,
                 progress: bool = False, on_epoch_end: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train a report model on ``config.reports``; returns ``{"best_epoch", "history", "model", "stage1"}``.

    A rerun into the same ``out_dir`` resumes an interrupted run from its last epoch
    and returns at once for a finished one. ``on_epoch_end(epoch=, record=)`` runs after
    each stage-2 epoch's state is saved (a test can raise there to simulate a kill).

    Examples
    --------
    >>> from histoscope.train.report import load_report_recipe, train_report                 # doctest: +SKIP
    >>> train_report(load_report_recipe("histogpt_tiny",                        # doctest: +SKIP
    ...                                 ["reports=reports.csv", "features_dir=features", "out_dir=run"]))
    """
    config.validate()
    log = log or (lambda message: None)
    out = Path(config.out_dir)
    slides = read_reports(config.reports, label_column=config.label_column)
    features_dir = Path(config.features_dir)
    paths = [features_path(features_dir, s.slide_id) for s in slides]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{features_dir}: {len(missing)} of {len(paths)} slides have no features file "
                                f"(e.g. {', '.join(missing[:5])}); embed them or drop their rows")
    dim = None
    for path in paths:
        _, dim = check_features(path, dim=dim)
    labelled = [s.label is not None for s in slides]
    run_stage1 = config.stage1.enabled and all(labelled)
    if config.stage1.enabled and any(labelled) and not all(labelled):
        raise ValueError(f"{config.reports}: {labelled.count(False)} slides have no {config.label_column}; stage 1 "
                         "needs a label for every slide (or set stage1.enabled=false)")
    roles = assign_roles(slides, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                         seed=config.seed, test_fold=config.test_fold)

    with output_folder(out):
        _check_run(out, config, overwrite)
        if report_model_path(out).exists() and not (out / "train_state.pt").exists():
            log(f"{out}: already trained (model.pt); --overwrite to train again")
            history = json.loads((out / "history.json").read_text())
            return {"best_epoch": history["best_epoch"], "history": history["epochs"],
                    "model": report_model_path(out), "stage1": None}
        write_columns(report_splits_path(out), {"slide_id": [s.slide_id for s in slides],
                                                "patient_id": [s.patient_id for s in slides], "split": roles})
        train_rows = [i for i, role in enumerate(roles) if role == "train"]
        val_rows = [i for i, role in enumerate(roles) if role == "val"]
        tokenizer = _tokenizer(config, out, [r for i in train_rows for r in slides[i].reports], log)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.precision, device)
        torch.manual_seed(derived_seed(config.seed))  # the same initial weights on every rerun
        model = _build_model(config, tokenizer, dim, log)
        stage1 = _stage1(config, out, slides, roles, model, log) if run_stage1 else None
        train_resampler = config.train_resampler if config.train_resampler is not None else stage1 is None
        trainable_parameters(model, train_resampler=train_resampler, train_lm=config.train_lm)
        model = model.to(device)
        dataset = BagDataset(paths, FeatureCache(int(config.cache_gb * 2**30)), max_tiles=config.max_tiles)
        train_batches = _Batches(slides, train_rows, dataset, tokenizer, config)
        val_batches = _Batches(slides, val_rows, dataset, tokenizer, config)
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"stage 2: {len(train_rows)} training and {len(val_rows)} validation slides, "
            f"{roles.count('test')} held out; {n_trained:,} of {sum(p.numel() for p in model.parameters()):,} "
            f"parameters trained (resampler {'trained' if train_resampler else 'frozen'}, language model "
            f"{'trained' if config.train_lm else 'frozen'}); device {device}, {dtype}")
        result = _fit(model, config, train_batches, val_batches, out=out, device=device, dtype=dtype, log=log,
                      progress=progress, on_epoch_end=on_epoch_end)
        model.load_state_dict(result["best_state"])
        save_report_model(report_model_path(out), model=model, name=config.model, lm_config=_lm_config(model),
                          resampler_config=_resampler_config(model.resampler), prompt=config.prompt,
                          extra={"config": config.to_dict(), "best_epoch": result["best_epoch"]})
        write_json(out / "history.json", {"best_epoch": result["best_epoch"], "epochs": result["history"]})
        (out / "train_state.pt").unlink(missing_ok=True)
    return {"best_epoch": result["best_epoch"], "history": result["history"], "model": report_model_path(out),
            "stage1": stage1}


def _fit(model, config: ReportConfig, train_batches: _Batches, val_batches: _Batches, *, out: Path, device, dtype,
         log, progress: bool, on_epoch_end) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # no decay on gains, biases, gates
    opt = AdamWSchedule.from_groups(groups, config, steps_per_epoch=len(train_batches), device=device, dtype=dtype)
    early = EarlyStopping(config.patience or config.epochs + 1, lower_is_better=True)
    state_path = out / "train_state.pt"
    early, history, best_state, first_epoch = resume_fit(state_path, model, opt, early)
    if first_epoch:
        log(f"stage 2: resuming after epoch {first_epoch}")
    bar = (StepProgress("train-report", (config.epochs - first_epoch) * len(train_batches))
           if progress and config.epochs > first_epoch else None)
    try:
        for epoch in range(first_epoch, config.epochs):
            if early.stopped:
                break
            started = time.perf_counter()
            torch.manual_seed(derived_seed(config.seed, epoch))
            model.train()
            total, steps = 0.0, 0
            for batch in train_batches(epoch):
                opt.optimizer.zero_grad(set_to_none=True)
                loss = _loss(model, batch, device, dtype)
                opt.scaler.scale(loss).backward()
                opt.step(model, config.grad_clip)
                total, steps = total + float(loss.detach()), steps + 1
                if bar is not None:
                    bar.advance(f"epoch {epoch + 1}/{config.epochs} loss {float(loss.detach()):.4f}")
            record = {"epoch": epoch, "train_loss": total / max(steps, 1), "lr": opt.optimizer.param_groups[0]["lr"]}
            val_loss = _validate(model, val_batches, device, dtype) if len(val_batches.indices) else None
            best_state = close_epoch(record, val_loss=val_loss, model=model, opt=opt, early=early, history=history,
                                     best_state=best_state, started=started, state_path=state_path,
                                     label=f"stage 2 epoch {epoch + 1}/{config.epochs}", log=log)
            if on_epoch_end is not None:
                on_epoch_end(epoch=epoch, record=record)
    finally:
        if bar is not None:
            bar.close()
    return {"best_state": best_state, "best_epoch": early.best_epoch, "history": history}
