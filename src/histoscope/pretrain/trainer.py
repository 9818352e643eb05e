"""The generic pretraining loop: one process or ``torchrun``, checkpoints, resume mid-epoch.

Output folder::

    OUT/config.yaml            the recipe as run (a rerun with a different recipe refuses)
    OUT/checkpoints/last.pt    student, teacher, loss centres, optimiser, next step
    OUT/log.jsonl              one line per logged step and per evaluation
    OUT/tensorboard/           if the tensorboard package is installed
    OUT/export/…               the trained model, as the objective exports it

Exact resumption: the data of a step are a function of ``(seed, step)`` (see
:mod:`histoscope.pretrain.data`) and torch's global generator (drop path) is reseeded
from ``(seed, step, rank)`` before every step, so the checkpoint only holds what training
changed. A killed run restarts at the step after its last checkpoint and ends with the
same weights as an uninterrupted one.

Per step: learning rate, weight decay and the prototype layers' learning rate (0 for
``freeze_last_layer_epochs``) from DINOv2's cosine schedules; the objective's losses under
autocast; backward (DDP averages gradients over processes); each of the objective's
modules clipped separately; AdamW; the objective's own update (EMA teacher).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.pretrain import distributed
from histoscope.pretrain.config import Recipe
from histoscope.pretrain.data import StepStream, TileIndex, find_images, find_slide_tiles, step_loader
from histoscope.pretrain.logs import RunLog
from histoscope.pretrain.objective import Objective, RunInfo, get_objective
from histoscope.pretrain.optim import apply_schedules, clip_grad_norms
from histoscope.pretrain.schedules import Schedule, cosine_schedule
from histoscope.utils.recipe import ConfigError

__all__ = ["pretrain", "build_schedules", "CHECKPOINT"]

CHECKPOINT = Path("checkpoints") / "last.pt"
# Keys that cannot change what a run computes, so a resumed run may differ in them.
_RESUME_FREE = ("out_dir", "device", "max_steps", "log_every", "checkpoint_every", "tensorboard", "data.workers",
                "eval.")


def build_schedules(recipe: Recipe) -> dict[str, Schedule]:
    """Learning rate, weight decay and prototype-layer learning rate per iteration (DINOv2's)."""
    optim = recipe.common.optim
    total, length = recipe.common.total_iters, optim.epoch_length
    lr = dict(base_value=optim.lr(), final_value=optim.min_lr, total_iters=total,
              warmup_iters=optim.warmup_epochs * length, start_warmup_value=0.0)
    last_layer = cosine_schedule(**lr)
    last_layer.values[: optim.freeze_last_layer_epochs * length] = 0  # prototypes frozen at first
    return {"lr": cosine_schedule(**lr), "last_layer_lr": last_layer,
            "wd": cosine_schedule(base_value=optim.weight_decay, final_value=optim.weight_decay_end,
                                  total_iters=total)}


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _check_same_run(out: Path, recipe: Recipe) -> None:
    import yaml

    stored = out / "config.yaml"
    if not stored.is_file():
        return
    before = _flat_dict(yaml.safe_load(stored.read_text()))
    now = _flat_dict(recipe.to_dict())
    changed = sorted(k for k in set(before) | set(now)
                     if not k.startswith(_RESUME_FREE) and _normal(before.get(k)) != _normal(now.get(k)))
    if changed:
        raise ConfigError(f"{out} holds a pretraining run with a different recipe (differs in {', '.join(changed)}); "
                          "use another output folder or --overwrite")


def _flat_dict(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "arch":
            out.update(_flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _write_config(out: Path, recipe: Recipe) -> None:
    import yaml

    from histoscope.io.atomic import atomic_path

    data = recipe.to_dict()
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _index(recipe: Recipe, log: Callable[[str], None]):
    data = recipe.common.data
    spec = get_objective(recipe.objective)
    if spec.index is not None:
        return spec.index(recipe.config, recipe.common, log)
    if data.images:
        return TileIndex(find_images(data.images))
    return TileIndex(find_slide_tiles(data.patches, slide_dir=data.slide_dir, log=log))


def pretrain(recipe: Recipe, *, overwrite: bool = False, progress: bool = False,
             log: Callable[[str], None] | None = print,
             on_step_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) ``recipe``; returns the last logged losses, evaluations and the export path.

    Runs alone, or as one of the processes ``torchrun`` starts (the same recipe on every
    rank; ``batch_size`` is the global batch). ``on_step_end(step)`` runs after a step's
    checkpoint is written (a test can raise there to simulate a kill).
    """
    common = recipe.common
    ctx = distributed.setup(common.device)
    echo = (log or (lambda message: None)) if ctx.is_main else (lambda message: None)
    out = Path(common.out_dir)
    try:
        if ctx.is_main:
            if overwrite and (out / CHECKPOINT).exists():
                (out / CHECKPOINT).unlink()
                (out / "log.jsonl").unlink(missing_ok=True)
                (out / "config.yaml").unlink(missing_ok=True)
            if (out / CHECKPOINT).exists():  # a run that never checkpointed has nothing to resume
                _check_same_run(out, recipe)
            _write_config(out, recipe)
        distributed.barrier()
        return _run(recipe, ctx, out, echo, progress, on_step_end)
    finally:
        distributed.teardown()


def _run(recipe: Recipe, ctx: distributed.DistContext, out: Path, echo, progress: bool, on_step_end) -> dict:
    from histoscope.utils.device import resolve_dtype

    common = recipe.common
    device = ctx.device
    dtype = resolve_dtype(None if common.precision == "auto" else common.precision, device)
    index = _index(recipe, echo)
    info = RunInfo(total_iters=common.total_iters, epoch_length=common.optim.epoch_length,
                   global_batch=common.optim.batch_size, device=device, seed=common.seed)
    objective: Objective = get_objective(recipe.objective).build(recipe.config, common, info)
    optimizer = torch.optim.AdamW(objective.param_groups(),
                                  betas=(common.optim.adamw_beta1, common.optim.adamw_beta2))
    schedules = build_schedules(recipe)
    start = 0
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True) if (out / CHECKPOINT).is_file() \
        else None
    if state is not None:
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        echo(f"resuming {out} at step {start + 1}")
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        objective.distribute(lambda module: DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False))
    stop = common.stop_step
    echo(f"{recipe.objective} on {common.encoder}: {index.describe()}, global batch {common.optim.batch_size} "
         f"over {ctx.world_size} process(es), steps {start + 1}..{stop} of {common.total_iters}, "
         f"{str(dtype).removeprefix('torch.')} on {device}")
    stream = StepStream(index, collate=objective.collate(), global_batch=common.optim.batch_size, rank=ctx.rank,
                        world_size=ctx.world_size, seed=common.seed, start_step=start, stop_step=stop,
                        chunk=common.data.chunk, buffer=common.data.buffer)
    runlog = RunLog(out, start_step=start, total_steps=stop, enabled=ctx.is_main,
                    tensorboard=common.tensorboard, progress=progress, echo=echo)
    evaluations: list[dict[str, float]] = []
    evaluate = _eval_hook(recipe, objective, device, ctx, runlog, evaluations)
    if start == 0:
        evaluate(0)
    last: dict[str, float] = {}
    try:
        started = time.perf_counter()
        for batch in step_loader(stream, workers=common.data.workers):
            step = int(batch["step"])
            for error in batch["read_errors"]:
                runlog.message(f"warning: step {step + 1}: unreadable tiles replaced: {error}")
            last = _train_step(objective, optimizer, schedules, batch, step, common, ctx, dtype)
            now = time.perf_counter()
            rate = common.optim.batch_size / max(now - started, 1e-9)
            started = now
            runlog.step(step, last, images_per_second=rate,
                        show=(step + 1) % common.log_every == 0 or step + 1 == stop)
            done = step + 1
            evaluate(done)
            if done % common.checkpoint_every == 0 or done == stop:
                _save(out, objective, optimizer, done, ctx)
            if on_step_end is not None:
                on_step_end(step)
        exported = objective.export(out) if ctx.is_main else None
        distributed.barrier()
    finally:
        runlog.close()
    if exported is not None:
        echo(f"exported {exported}")
    return {"losses": last, "evaluations": evaluations, "export": exported, "steps": stop}


def _train_step(objective: Objective, optimizer, schedules, batch, step: int, common, ctx, dtype) -> dict[str, float]:
    device = ctx.device
    torch.manual_seed(_step_seed(common.seed, step, ctx.rank))
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    lr, wd, last_layer_lr = schedules["lr"][step], schedules["wd"][step], schedules["last_layer_lr"][step]
    apply_schedules(optimizer, lr=lr, wd=wd, last_layer_lr=last_layer_lr)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        losses = objective(batch, step=step)
    losses["loss"].backward()
    clip_grad_norms(objective.clip_modules(), common.optim.clip_grad)
    optimizer.step()
    objective.after_step(step)
    values = torch.stack([v.detach().float() for k, v in losses.items() if k != "loss"])
    distributed.all_reduce(values)
    values = (values / ctx.world_size).tolist()
    names = [k for k in losses if k != "loss"]
    reduced = dict(zip(names, values))
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"step {step + 1}: a loss is not finite ({reduced}); lower optim.base_lr, "
                                 "raise optim.warmup_epochs or use precision=fp32")
    return {"total_loss": sum(values), **reduced, "lr": lr, "wd": wd, "last_layer_lr": last_layer_lr,
            **objective.step_stats(step)}


def _save(out: Path, objective: Objective, optimizer, done: int, ctx) -> None:
    state_dict = objective.state_dict()  # every rank: waits for pending centre all-reduces
    if ctx.is_main:
        from histoscope.io.atomic import atomic_path

        with atomic_path(out / CHECKPOINT) as tmp:
            torch.save({"step": done, "objective": state_dict, "optimizer": optimizer.state_dict()}, tmp)


def _eval_hook(recipe: Recipe, objective: Objective, device, ctx, runlog: RunLog,
               evaluations: list[dict[str, float]]) -> Callable[[int], None]:
    """``evaluate(done)`` probes after ``done`` steps when due and appends to ``evaluations``."""
    settings = recipe.common.eval
    if not settings.every or not ctx.is_main:
        return lambda done: None
    from histoscope.pretrain.evaluation import probe, read_labelled_tiles

    size = getattr(objective, "input_size", 224)  # the objective's training crop size
    tiles = read_labelled_tiles(settings.images, size=size, test_fraction=settings.test_fraction,
                                seed=recipe.common.seed)

    def evaluate(done: int) -> None:
        if done % settings.every == 0 or done == recipe.common.stop_step:
            metrics = probe(objective, tiles, device=device, k=settings.k, linear=settings.linear,
                            batch_size=settings.batch_size)
            runlog.eval(done - 1, metrics)
            evaluations.append({"steps_done": done, **metrics})

    return evaluate
