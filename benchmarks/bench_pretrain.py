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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()

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
