"""One fold's training: AdamW with warm-up and cosine decay, accumulation, mixed precision,
early stopping, and a state file written every epoch so a killed run resumes exactly.

Exact resumption needs every random draw to be a function of ``(seed, fold, epoch)``:
the epoch's order and tile subsets come from seeded numpy generators, and torch's
global generator (dropout) is reseeded at the start of every epoch. The state file
then only needs what training itself changed: weights, optimizer moments, the
schedule position, the loss scaler and the early-stopping bookkeeping.

Notation: B bags per batch, N tiles, D feature dim, C outputs, n slides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from histoscope.eval.metrics import LOWER_IS_BETTER
from histoscope.slide import SlideModel
from histoscope.slide.bags import collate_bags
from histoscope.train.checkpoint import load_state, save_state
from histoscope.train.data import BagDataset, Sample, epoch_order
from histoscope.train.optim import param_groups
from histoscope.train.tasks import Task
from histoscope.utils.device import autocast

__all__ = ["AdamWSchedule", "EarlyStopping", "FitResult", "close_epoch", "fit", "format_value", "predict_bags", "warmup_cosine",
           "derived_seed", "resume_fit", "save_fit_state"]


def format_value(value: float, spec: str = ".4g") -> str:
    """A metric for a log line: ``n/a`` where it cannot be computed (NaN), never a made-up number."""
    return format(value, spec) if math.isfinite(value) else "n/a"


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (e.g. seed, fold, epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def warmup_cosine(*, total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


@dataclass
class EarlyStopping:
    patience: int
    lower_is_better: bool
    best: float = float("nan")
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's validation value; True if it is the best so far."""
        better = (self.best_epoch < 0 or (value < self.best if self.lower_is_better else value > self.best))
        if better and math.isfinite(value):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.patience
        return False


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def predict_bags(model: SlideModel, dataset: BagDataset, indices: Sequence[int], *, batch_size: int,
                 device: torch.device, dtype: torch.dtype, with_scores: bool = False
                 ) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """``(logits (n, C) float64, per-tile scores [(N_i,)] or None)`` with the model in eval mode."""
    model.eval()
    logits, scores = [], [] if with_scores else None
    for start in range(0, len(indices), batch_size):
        batch = list(indices[start : start + batch_size])
        features, coords, mask = collate_bags([dataset.bag(i) for i in batch])
        with autocast(device, dtype):
            output = model(features.to(device), coords.to(device), mask.to(device))
        logits.append(output.logits.float().cpu().numpy().astype(np.float64))
        if with_scores:
            tile_scores = output.scores.float().cpu().numpy() if output.scores is not None else None
            for row, length in enumerate(mask.sum(1).tolist()):
                scores.append(tile_scores[row, :length] if tile_scores is not None else np.full(length, np.nan))
    return np.concatenate(logits) if logits else np.zeros((0, model.num_outputs)), scores


def _validate(model, task: Task, dataset, indices, samples: list[Sample], targets, *, batch_size, device, dtype
              ) -> dict[str, float]:
    logits, _ = predict_bags(model, dataset, indices, batch_size=batch_size, device=device, dtype=dtype)
    loss = float(task.loss(torch.from_numpy(logits).float(), targets).item())
    columns = {**task.truth_columns(samples), **task.output_columns(logits)}
    metrics, arrays, _ = task.metric_inputs(columns)
    return {"loss": loss, **metrics(*arrays)}


@dataclass
class AdamWSchedule:
    """AdamW over parameter groups, its warm-up + cosine schedule (stepped per optimizer
    step; ``config`` gives ``lr``, ``epochs``, ``warmup_epochs``, ``min_lr_ratio``) and the
    fp16 loss scaler, saved and restored together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, model: SlideModel, config, *, steps_per_epoch: int, device: torch.device,
               dtype: torch.dtype) -> AdamWSchedule:
        """For a slide model: every trainable parameter, layer-wise lr decay if the recipe asks."""
        groups = param_groups(model, lr=config.lr, weight_decay=config.weight_decay, layer_decay=config.layer_decay)
        return cls.from_groups(groups, config, steps_per_epoch=steps_per_epoch, device=device, dtype=dtype)

    @classmethod
    def from_groups(cls, groups: list[dict], config, *, steps_per_epoch: int, device: torch.device,
                    dtype: torch.dtype) -> AdamWSchedule:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            total_steps=max(1, config.epochs * steps_per_epoch),
            warmup_steps=round(config.warmup_epochs * steps_per_epoch), min_ratio=config.min_lr_ratio))
        return cls(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))

    def step(self, model: torch.nn.Module, grad_clip: float | None) -> None:
        if grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _train_epoch(model: SlideModel, task: Task, dataset: BagDataset, train_indices: Sequence[int], targets: Tensor,
                 weights: np.ndarray | None, opt: AdamWSchedule, config, *, seed: tuple[int, int, int],
                 device: torch.device, dtype: torch.dtype) -> float:
    """One epoch over the training slides in the order ``seed`` draws; returns the mean loss."""
    model.train()
    positions = epoch_order(len(train_indices), seed=seed, weights=weights)
    batches = [positions[i : i + config.batch_size] for i in range(0, len(positions), config.batch_size)]
    running = 0.0
    for group_start in range(0, len(batches), config.accumulate):
        group = batches[group_start : group_start + config.accumulate]
        opt.optimizer.zero_grad(set_to_none=True)
        for batch in group:
            features, coords, mask = collate_bags([dataset.bag(train_indices[p], subsample_seed=seed) for p in batch])
            target = targets[batch].to(device)
            with autocast(device, dtype):
                output = model(features.to(device), coords.to(device), mask.to(device))
                loss = task.loss(output.logits.float(), target)
                auxiliary = model.auxiliary_loss(output, target) if task.kind == "classification" else None
            if auxiliary is not None:
                loss = loss + auxiliary.float()
            opt.scaler.scale(loss / len(group)).backward()
            running += float(loss.detach()) * len(batch)
        opt.step(model, config.grad_clip)
    return running / len(positions)


def fit(
    *,
    model: SlideModel,
    task: Task,
    dataset: BagDataset,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    samples: list[Sample],
    config,
    fold_number: int,
    fold_name: str,
    device: torch.device,
    dtype: torch.dtype,
    state_path: Path,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[..., None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_indices``, early-stopping on ``val_indices``; resumes from ``state_path``.

    ``fold_number`` (0, 1, …) seeds the fold's randomness; ``fold_name`` labels it in logs
    and in ``on_epoch_end(fold=fold_name, epoch=, record=)``, which runs after each
    epoch's state is saved (a test can raise there to simulate a kill).
    """
    log = log or (lambda message: None)
    train_samples = [samples[i] for i in train_indices]
    val_samples = [samples[i] for i in val_indices]
    train_targets = task.targets(train_samples)
    val_targets = task.targets(val_samples) if val_samples else None
    weights = task.sample_weights(train_samples) if config.balanced_sampling else None

    batches_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    opt = AdamWSchedule.create(model, config, steps_per_epoch=math.ceil(batches_per_epoch / config.accumulate),
                            device=device, dtype=dtype)
    monitor = config.monitor if val_samples else "none"
    if monitor not in ("loss", "none") and monitor in task.undefined_metrics(val_samples):
        log(f"warning: fold {fold_name}: {monitor} cannot be computed on its {len(val_samples)} validation slides "
            "(too few, or one class); early stopping monitors the validation loss")
        monitor = "loss"
    early = EarlyStopping(config.patience, lower_is_better=monitor in LOWER_IS_BETTER)
    early, history, best_state, first_epoch = resume_fit(state_path, model, opt, early)
    if first_epoch:
        log(f"fold {fold_name}: resuming after epoch {first_epoch - 1}")

    for epoch in range(first_epoch, config.epochs):
        if early.stopped:
            break
        started = time.perf_counter()
        torch.manual_seed(derived_seed(config.seed, fold_number, epoch))
        train_loss = _train_epoch(model, task, dataset, train_indices, train_targets, weights, opt, config,
                                  seed=(config.seed, fold_number, epoch), device=device, dtype=dtype)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": max(g["lr"] for g in opt.optimizer.param_groups)}
        if val_samples:
            val = _validate(model, task, dataset, val_indices, val_samples, val_targets,
                            batch_size=config.batch_size, device=device, dtype=dtype)
            record.update({f"val_{k}": v for k, v in val.items()})
            if monitor not in val:
                raise ValueError(f"monitor {monitor!r} is not a validation value; choose from {sorted(val)}")
            improved = early.update(val[monitor], epoch)
        else:
            improved, early.best_epoch = True, epoch
        if improved:
            best_state = _copy_state(model)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        log(f"fold {fold_name} epoch {epoch + 1}/{config.epochs} " +
            " ".join(f"{k}={format_value(v)}" for k, v in record.items() if k not in ("epoch", "seconds")) +
            (" *" if improved else ""))
        save_fit_state(state_path, epoch=epoch, model=model, opt=opt, early=early, history=history,
                       best_state=best_state)
        if on_epoch_end is not None:
            on_epoch_end(fold=fold_name, epoch=epoch, record=record)
    return FitResult(best_state=best_state, best_epoch=early.best_epoch, history=history)


def resume_fit(state_path: Path, model: torch.nn.Module, opt: AdamWSchedule, early: EarlyStopping
               ) -> tuple[EarlyStopping, list[dict[str, float]], dict[str, Tensor], int]:
    """``(early stopping, history, best state, first epoch)`` to continue from: those saved in
    ``state_path`` (loading the model and optimizer from it too), or a fresh start."""
    state = load_state(state_path)
    if state is None:
        return early, [], _copy_state(model), 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state)
    return EarlyStopping(**state["early"]), state["history"], state["best_state"], state["epoch"] + 1


def save_fit_state(state_path: Path, *, epoch: int, model: torch.nn.Module, opt: AdamWSchedule,
                   early: EarlyStopping, history: list[dict[str, float]], best_state: dict[str, Tensor]) -> None:
    """What :func:`resume_fit` needs to continue after ``epoch``, written atomically."""
    save_state(state_path, {"epoch": epoch, "model": model.state_dict(), **opt.state_dict(), "early": asdict(early),
                            "history": history, "best_state": best_state})


def close_epoch(record: dict, *, val_loss: float | None, model: torch.nn.Module, opt: AdamWSchedule,
                early: EarlyStopping, history: list[dict], best_state: dict[str, Tensor], started: float,
                state_path: Path, label: str, log: Callable[[str], None]) -> dict[str, Tensor]:
    """The end of an epoch monitored by validation loss: record it (``val_loss`` None: no
    validation set, every epoch counts as the best), log one line, save the resumable
    state. Returns the best state so far."""
    if val_loss is not None:
        record["val_loss"] = val_loss
        improved = early.update(val_loss, record["epoch"])
    else:
        improved, early.best_epoch = True, record["epoch"]
    if improved:
        best_state = _copy_state(model)
    record["seconds"] = time.perf_counter() - started
    history.append(record)
    log(f"{label} " + " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("stage", "epoch", "seconds"))
        + (" *" if improved else ""))
    save_fit_state(state_path, epoch=record["epoch"], model=model, opt=opt, early=early, history=history,
                   best_state=best_state)
    return best_state


def _copy_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
