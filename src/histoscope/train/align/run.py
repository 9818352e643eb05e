"""``histoscope train-align``: contrastive (and captioning) training on an image–text pair table.

Output folder::

    OUT/config.yaml     the recipe as run (a rerun with another recipe refuses)
    OUT/splits.csv      every usable row of the pair table with its split (train/val/test)
    OUT/tokenizer/      the tokenizer (given, the text model's, or a BPE trained on the training captions)
    OUT/model.pt        the model with the lowest validation loss (load_align_run / histoscope zeroshot)
    OUT/history.json    per-epoch losses, temperature and learning rate
    OUT/train_state.pt  while unfinished: the last epoch's state; a rerun resumes from it

Exact resumption: the model's initial weights come from ``seed``, each epoch's pair
order from ``(seed, epoch)`` and torch's generator is reseeded every epoch, so the
state file only holds what training changed.

Notation: B pairs per batch, L tokens, E joint embedding dim.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.io.atomic import atomic_path, remove_stale_partials, write_json
from histoscope.io.pairs import Pair, read_pairs
from histoscope.language.align.data import PairInputs
from histoscope.language.align.losses import caption_loss, clip_loss
from histoscope.language.align.registry import builder_parameters, load_align_model, resolved_arch
from histoscope.language.align.tokenizer import TextTokenizer, train_bpe_tokenizer
from histoscope.language.align.trained import align_model_path, save_align_model, save_tokenizer, tokenizer_path
from histoscope.train.align.config import AlignConfig
from histoscope.train.config import ConfigError, record_recipe
from histoscope.train.loop import AdamWSchedule, EarlyStopping, close_epoch, derived_seed, resume_fit
from histoscope.utils.device import autocast, resolve_device, resolve_dtype
from histoscope.utils.progress import StepProgress

__all__ = ["train_align", "assign_splits", "read_splits", "splits_path"]

# Settings that cannot change what a run computes, so a resumed run may differ in them.
_RESUME_FREE = {"device", "out_dir"}


def splits_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "splits.csv"


def assign_splits(pairs: list[Pair], *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Each pair's split: its own ``split`` value, else drawn (seeded) in the given fractions."""
    free = [i for i, pair in enumerate(pairs) if pair.split is None]
    n_test, n_val = round(test_fraction * len(free)), round(val_fraction * len(free))
    roles = [pair.split for pair in pairs]
    for rank, j in enumerate(np.random.default_rng(seed).permutation(len(free))):
        roles[free[j]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return roles


def _write_splits(run_dir: Path, pairs: list[Pair], roles: list[str]) -> None:
    with atomic_path(splits_path(run_dir)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "split", "path", "caption"])
        writer.writerows([pair.row, role, str(pair.path), pair.caption] for pair, role in zip(pairs, roles))


def read_splits(run_dir: str | Path) -> dict[int, str]:
    """Pair-table row -> split, as a run assigned them."""
    with open(splits_path(run_dir), newline="") as fh:
        return {int(r["row"]): r["split"] for r in csv.DictReader(fh)}


def _check_run(out: Path, config: AlignConfig, overwrite: bool) -> None:
    if overwrite:
        for name in ("train_state.pt", "model.pt", "history.json", "splits.csv"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(tokenizer_path(out), ignore_errors=True)
    started = any(p.exists() for p in (out / "train_state.pt", align_model_path(out), tokenizer_path(out)))
    record_recipe(out, config, resume=started, resume_free=_RESUME_FREE)


def _tokenizer(config: AlignConfig, out: Path, arch: dict[str, Any], captions: list[str], log) -> TextTokenizer:
    reserve_cls = arch.get("text_model", "coca") == "coca"  # CoCa towers append a class token
    settings = dict(context_length=arch["context_length"], reserve_cls=reserve_cls)
    if tokenizer_path(out).is_dir():  # a resumed run keeps its tokenizer
        return TextTokenizer.load(tokenizer_path(out), **settings)
    source = config.tokenizer or (arch.get("text_path") if arch.get("text_model") == "hf" else None)
    if source is not None:
        tokenizer = TextTokenizer.load(source, **settings)
    else:
        tokenizer = TextTokenizer(train_bpe_tokenizer(captions, vocab_size=config.vocab_size), **settings)
        log(f"trained a byte-level BPE tokenizer on {len(captions)} captions: {tokenizer.vocab_size} tokens")
    save_tokenizer(tokenizer, out)
    return tokenizer


def _arch(config: AlignConfig, tokenizer: TextTokenizer, inputs: PairInputs) -> dict[str, Any]:
    arch = resolved_arch(config.model, tiny=config.tiny, **config.model_args)
    accepts = builder_parameters(config.model)
    derived = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id}
    if inputs.kind == "features" and arch.get("image_encoder") is None:
        derived["features_dim"] = inputs.features_dim
    for key, value in derived.items():
        if key in accepts and key not in config.model_args:
            arch[key] = value
    return arch


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # open_clip: no weight decay on gains, biases and the temperature (every parameter of < 2 dims)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def _batches(n: int, batch_size: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    """``n`` indices in ``ceil(n / batch_size)`` near-equal batches, so none is left with a single pair."""
    indices = np.arange(n) if order is None else order
    return [b for b in np.array_split(indices, max(1, math.ceil(n / batch_size))) if len(b)]


def _losses(model, inputs: PairInputs, ids: torch.Tensor, batch: np.ndarray, config: AlignConfig,
            device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    transform = model.transform if inputs.kind == "image" else None
    x, mask = inputs.batch(batch.tolist(), transform)
    captioning = config.caption_weight > 0
    with autocast(device, dtype):
        output = model(x.to(device), ids[batch].to(device), None if mask is None else mask.to(device),
                       caption=captioning)
    losses = {"clip": clip_loss(output.image_embedding, output.text_embedding, output.logit_scale)}
    total = config.clip_weight * losses["clip"]
    if captioning:
        losses["caption"] = caption_loss(output.caption_logits, output.caption_labels, pad_id=model.pad_id)
        total = total + config.caption_weight * losses["caption"]
    losses["loss"] = total
    return losses


@torch.no_grad()
def _validate(model, inputs, ids, config, device, dtype) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    for batch in _batches(len(inputs), config.batch_size):
        for name, value in _losses(model, inputs, ids, batch, config, device, dtype).items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(batch)
    return {name: total / len(inputs) for name, total in sums.items()}


def train_align(config: AlignConfig, *, overwrite: bool = False, log: Callable[[str], None] | None = None,
                progress: bool = False, on_epoch_end: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train an image–text model on ``config.pairs``; returns ``{"best_epoch", "history", "model"}``.

    A rerun into the same ``out_dir`` resumes an interrupted run from its last epoch
    (ending with the same model) and returns at once for a finished one.
    ``on_epoch_end(epoch=, record=)`` runs after each epoch's state is saved.

    Examples
    --------
    >>> from histoscope.train.align import load_align_recipe, train_align                      # doctest: +SKIP
    >>> train_align(load_align_recipe("align_tiny", ["pairs=pairs.csv"]))          # doctest: +SKIP
    """
    config.validate()
    log = log or (lambda message: None)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, config, overwrite)
    remove_stale_partials(out)
    if align_model_path(out).exists() and not (out / "train_state.pt").exists():
        log(f"{out}: already trained (model.pt); --overwrite to train again")
        history = json.loads((out / "history.json").read_text())
        return {"best_epoch": history["best_epoch"], "history": history["epochs"], "model": align_model_path(out)}

    pairs, problems = read_pairs(config.pairs)
    inputs, unreadable = PairInputs(pairs).check()
    for problem in problems + unreadable:
        log(f"skipped {problem}")
    pairs = inputs.pairs
    roles = assign_splits(pairs, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                          seed=config.seed)
    _write_splits(out, pairs, roles)
    train_rows = [i for i, role in enumerate(roles) if role == "train"]
    val_rows = [i for i, role in enumerate(roles) if role == "val"]
    if len(train_rows) < 2:
        raise ValueError(f"{config.pairs}: {len(train_rows)} usable training pairs; contrastive training needs "
                         "at least 2 (check the skipped rows above and the split column)")

    arch = resolved_arch(config.model, tiny=config.tiny, **config.model_args)
    tokenizer = _tokenizer(config, out, arch, [pairs[i].caption for i in train_rows], log)
    arch = _arch(config, tokenizer, inputs)
    device = resolve_device(config.device)
    dtype = resolve_dtype(None if config.precision == "auto" else config.precision, device)
    torch.manual_seed(derived_seed(config.seed))  # the same initial weights on every rerun
    model = load_align_model(config.model, weights=config.weights, **arch)
    if model.text.embed_cls != tokenizer.reserve_cls:
        raise ConfigError(f"the tokenizer {'reserves' if tokenizer.reserve_cls else 'does not reserve'} a class "
                          f"token position but the text tower {type(model.text).__name__} does not match")
    if config.caption_weight > 0 and model.text_decoder is None:
        raise ConfigError("caption_weight > 0 needs a captioning decoder: set model_args.decoder_layers > 0 "
                          "(clip) or use conch")
    model = model.to(device)
    ids = tokenizer([pair.caption for pair in pairs])  # (n, L)
    train_inputs, val_inputs = inputs.subset(train_rows), inputs.subset(val_rows)
    train_ids, val_ids = ids[train_rows], ids[val_rows]
    log(f"{len(train_rows)} training and {len(val_rows)} validation pairs ({inputs.kind}), model {config.model}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, "
        f"device {device}, {dtype}")
    result = _fit(model, config, train_inputs, train_ids, val_inputs, val_ids, out=out, device=device, dtype=dtype,
                  log=log, progress=progress, on_epoch_end=on_epoch_end)
    model.load_state_dict(result["best_state"])
    save_align_model(align_model_path(out), model=model, name=config.model, arch=arch, tokenizer=tokenizer,
                     extra={"config": config.to_dict(), "best_epoch": result["best_epoch"]})
    write_json(out / "history.json", {"best_epoch": result["best_epoch"], "epochs": result["history"]})
    (out / "train_state.pt").unlink(missing_ok=True)
    return {"best_epoch": result["best_epoch"], "history": result["history"], "model": align_model_path(out)}


def _fit(model, config: AlignConfig, train_inputs, train_ids, val_inputs, val_ids, *, out: Path, device, dtype, log,
         progress: bool, on_epoch_end) -> dict[str, Any]:
    steps_per_epoch = len(_batches(len(train_inputs), config.batch_size))
    opt = AdamWSchedule.from_groups(_param_groups(model, config.weight_decay), config,
                                    steps_per_epoch=steps_per_epoch, device=device, dtype=dtype)
    early = EarlyStopping(config.patience or config.epochs + 1, lower_is_better=True)
    state_path = out / "train_state.pt"
    early, history, best_state, first_epoch = resume_fit(state_path, model, opt, early)
    if first_epoch:
        log(f"resuming after epoch {first_epoch}")
    bar = (StepProgress("train-align", (config.epochs - first_epoch) * steps_per_epoch)
           if progress and config.epochs > first_epoch else None)
    try:
        for epoch in range(first_epoch, config.epochs):
            if early.stopped:
                break
            started = time.perf_counter()
            torch.manual_seed(derived_seed(config.seed, epoch))
            model.train()
            order = np.random.default_rng([config.seed, epoch]).permutation(len(train_inputs))
            sums: dict[str, float] = {}
            for batch in _batches(len(train_inputs), config.batch_size, order):
                opt.optimizer.zero_grad(set_to_none=True)
                losses = _losses(model, train_inputs, train_ids, batch, config, device, dtype)
                opt.scaler.scale(losses["loss"]).backward()
                opt.step(model, config.grad_clip)
                model.clamp_logit_scale()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(batch)
                if bar is not None:
                    bar.advance(f"epoch {epoch + 1}/{config.epochs} loss {float(losses['loss'].detach()):.4f}")
            record = {"epoch": epoch, **{f"train_{k}": v / len(train_inputs) for k, v in sums.items()},
                      "logit_scale": float(model.logit_scale.detach().exp()), "lr": opt.optimizer.param_groups[0]["lr"]}
            if len(val_inputs):
                record.update({f"val_{k}": v for k, v in
                               _validate(model, val_inputs, val_ids, config, device, dtype).items()})
            best_state = close_epoch(record, val_loss=record.get("val_loss"), model=model, opt=opt, early=early,
                                     history=history, best_state=best_state, started=started, state_path=state_path,
                                     label=f"epoch {epoch + 1}/{config.epochs}", log=log)
            if on_epoch_end is not None:
                on_epoch_end(epoch=epoch, record=record)
    finally:
        if bar is not None:
            bar.close()
    return {"best_state": best_state, "best_epoch": early.best_epoch, "history": history}
