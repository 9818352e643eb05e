"""DINOv2 pretraining step: is the data pipeline the bottleneck?

Usage: python benchmarks/bench_pretrain.py [--steps 3] [--batch 32] [--workers 1] [--precision bf16]

ViT-S/16 (LayerScale, as DINOv2's), global batch 32, 2 x 224 px + 8 x 96 px crops, DINO and
iBOT heads with 65,536 prototypes, one process. Rows (median seconds per step after one
warm-up step, all measured in this run):
  student fwd+bwd   the student alone (backbone on masked global and local crops, both heads)
                    forward and backward on crops already in memory
  DINOv2 compute    the whole optimisation step on crops in memory: teacher forward,
                    student forward/backward, losses, clipping, AdamW, EMA
  DINOv2 pipeline   `histoscope pretrain dinov2`: tiles streamed from a sample slide, read
                    and augmented by data-loader workers while the model trains
The "data not the bottleneck" ratio is compute / pipeline (>= 0.85 wanted).

With --slide-mae: slide-level MAE (`histoscope pretrain slide_mae`, slide_mae_gigapath:
Prov-GigaPath's LongNet, 12 layers x 768, 75% of the tiles masked, a 2-layer 384-wide decoder
over all tiles) on one slide of --tiles tiles (1536-d embeddings on a square grid). Each case
runs in a fresh process (peak memory = its peak RSS; "step delta" = the rise during the steps):
  dilated   the published dilated-attention branches (1024,1) (5792,2) (32768,4) (185363,8) (1048576,16)
  dense     the dense-attention equivalent: one segment over the whole sequence, no dilation
            (full softmax attention through the same fused kernel)
Median wall and CPU seconds (all threads of the process: steadier on a shared machine) per
optimisation step (forward, backward, AdamW) after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _slide_mae_case(kind: str, tiles: int, steps: int, precision: str) -> dict[str, float]:
    """One slide-MAE configuration, timed in this process (run it in a fresh one)."""
    import resource

    import numpy as np
    import torch

    from histoscope.io.features_h5 import write_features
    from histoscope.pretrain import distributed, get_objective, load_pretrain_recipe
    from histoscope.pretrain.data import StepStream
    from histoscope.pretrain.objective import RunInfo
    from histoscope.pretrain.trainer import _train_step, build_schedules
    from histoscope.utils.device import resolve_dtype

    root = Path(tempfile.mkdtemp(prefix="bench_slide_mae_"))
    side = int(np.ceil(tiles ** 0.5))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:tiles]
    rng = np.random.default_rng(0)
    write_features(root / "slide.h5", rng.normal(size=(tiles, 1536)).astype(np.float32), grid * 512,
                   coords_attrs={"patch_size": 256, "patch_size_level0": 512, "target_mpp": 0.5, "level0_mpp": 0.25})
    total = steps + 1
    overrides = [f"data.features=[{root}]", "optim.batch_size=1", f"precision={precision}", "optim.epochs=1",
                 f"optim.epoch_length={total}", "optim.warmup_epochs=0", "device=cpu", "tensorboard=false"]
    if kind == "dense":
        overrides += ["arch={dropout: 0.0, drop_path_rate: 0.1, segment_lengths: [1048576], dilation_ratios: [1]}"]
    recipe = load_pretrain_recipe("slide_mae", Path(__file__).parents[1] / "recipes" / "slide_mae_gigapath.yaml",
                                  overrides)
    device = torch.device("cpu")
    dtype = resolve_dtype(precision, device)
    torch.manual_seed(0)
    spec = get_objective("slide_mae")
    info = RunInfo(total_iters=total, epoch_length=total, global_batch=1, device=device, seed=0)
    objective = spec.build(recipe.config, recipe.common, info)
    stream = StepStream(spec.index(recipe.config, recipe.common, lambda m: None), collate=objective.collate(),
                        global_batch=1, rank=0, world_size=1, seed=0, start_step=0, stop_step=1, chunk=1, buffer=1)
    batch = next(iter(stream))
    optimizer = torch.optim.AdamW(objective.param_groups())
    schedules = build_schedules(recipe)
    ctx = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = []

    def step():
        losses.append(_train_step(objective, optimizer, schedules, dict(batch), 0, recipe.common, ctx, dtype)
                      ["slide_mae_loss"])

    step()  # warm-up
    wall, cpu = [], []
    for _ in range(steps):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu), "peak_mb": peak / 1024,
            "delta_mb": max(peak - before, 0) / 1024, "loss": losses[-1]}


def slide_mae_table(tiles: int, steps: int, precision: str) -> None:
    import subprocess
    import sys

    results = {}
    for kind in ("dilated", "dense"):
        code = (f"import json, bench_pretrain as b; "
                f"print(json.dumps(b._slide_mae_case({kind!r}, {tiles}, {steps}, {precision!r})))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=str(Path(__file__).parent), check=False)
        if run.returncode:
            raise RuntimeError(f"{kind} failed:\n{run.stderr[-3000:]}")
        results[kind] = json.loads(run.stdout.strip().splitlines()[-1])
    dil, den = results["dilated"], results["dense"]
    print(f"Slide MAE step, gigapath_slide (12 x 768) + 2 x 384 decoder, one slide of {tiles:,} tiles "
          f"({int(tiles * 0.25):,} kept), {precision}")
    print("| attention | s/step (wall) | CPU s/step (all threads) | peak MB | step delta MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("dilated (published branches)", dil), ("dense equivalent", den)):
        print(f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} |")
    print(f"dense / dilated: wall time {den['seconds'] / dil['seconds']:.2f}x, CPU time "
          f"{den['cpu_seconds'] / dil['cpu_seconds']:.2f}x, peak memory {den['peak_mb'] / dil['peak_mb']:.2f}x, "
          f"step delta {den['delta_mb'] / max(dil['delta_mb'], 1):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--slide-mae", action="store_true", help="the slide-MAE table instead of the DINOv2 one")
    parser.add_argument("--tiles", type=int, default=10_000, help="tiles of the slide (--slide-mae)")
    args = parser.parse_args()
    if args.slide_mae:
        slide_mae_table(args.tiles, args.steps, args.precision)
        return

    import torch

    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import LocalExecutor, tile_slides
    from histoscope.pretrain import get_objective, load_pretrain_recipe, pretrain
    from histoscope.pretrain.data import StepStream, TileIndex, find_slide_tiles
    from histoscope.pretrain.objective import RunInfo
    from histoscope.pretrain.trainer import _train_step, build_schedules
    from histoscope.pretrain import distributed
    from histoscope.utils.device import resolve_dtype

    root = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    make_sample_slide(root / "slides" / "sample.svs", width=8192, height=6144, mpp=0.25, seed=0)
    assert tile_slides([root / "slides"], out_dir=root / "out", executor=LocalExecutor(workers=0), progress=False).ok
    total = args.steps + 1
    overrides = [f"data.patches=[{root / 'out'}]", f"optim.batch_size={args.batch}", f"data.workers={args.workers}",
                 f"precision={args.precision}", "optim.epochs=1", f"optim.epoch_length={total}",
                 "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
                 "log_every=1", "tensorboard=false", "device=cpu"]
    recipe = load_pretrain_recipe("dinov2", "dinov2_vits16", overrides)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.precision, device)

    # crops in memory: one batch made by the same collate the pipeline uses
    info = RunInfo(total_iters=total, epoch_length=total, global_batch=args.batch, device=device, seed=0)
    objective = get_objective("dinov2").build(recipe.config, recipe.common, info)
    index = TileIndex(find_slide_tiles([root / "out"], log=lambda m: None))
    stream = StepStream(index, collate=objective.collate(), global_batch=args.batch, rank=0, world_size=1, seed=0,
                        start_step=0, stop_step=1)
    batch = next(iter(stream))
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def student_only():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = objective.student(objective.normalize(tensors["global_crops"]),
                                    objective.normalize(tensors["local_crops"]), tensors["masks"],
                                    tensors["mask_indices"])
            loss = sum(v.float().mean() for v in out.values())
        loss.backward()
        objective.student.zero_grad(set_to_none=True)

    optimizer = torch.optim.AdamW(objective.param_groups())
    schedules = build_schedules(recipe)
    ctx = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=device)

    def full_step():
        _train_step(objective, optimizer, schedules, dict(batch), 0, recipe.common, ctx, dtype)

    student = _timed(student_only, args.steps)
    compute = _timed(full_step, args.steps)
    del objective, optimizer

    recipe.common.out_dir = str(root / "run")
    pretrain(recipe, overwrite=True, log=None)
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    pipeline = statistics.median(args.batch / r["images_per_second"] for r in log[1:])  # after the warm-up step

    print(f"DINOv2 step, ViT-S/16, global batch {args.batch}, {args.precision}, {args.workers} data worker(s), "
          f"{torch.get_num_threads()} torch threads")
    print(f"| {'':18} | s/step | img/s | ratio to pipeline |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (("student fwd+bwd", student), ("DINOv2 compute", compute), ("DINOv2 pipeline", pipeline)):
        print(f"| {name:18} | {seconds:6.2f} | {args.batch / seconds:5.1f} | {seconds / pipeline:5.2f} |")
    print(f"data not the bottleneck (compute / pipeline): {compute / pipeline:.2f}")


if __name__ == "__main__":
    main()
