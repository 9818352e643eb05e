"""The same slides through the local executor and through Ray: overhead, scaling, latency.

Usage: python benchmarks/bench_scale.py [--slides 8] [--size 3072x2048] [--workers 1,2]

Every run is ``histoscope run`` in a new process, as a user starts it: the same --slides
sample slides (0.25 µm/px, tiles of 256 px at 0.5 µm/px, a small UNI-architecture ViT with
seeded random weights, fp32 on CPU) tiled and embedded into a new output folder, timed from
the start of the command to its end; local and ray take turns, --repeats times, and the
fewest seconds count:

  local N            --workers N: tiling in N worker processes, then every slide streamed
                     through one model with N tile-decoding processes (the default executor)
  ray N              --executor ray: one Ray task per slide and stage, on a loopback head with
                     N CPUs started beforehand (its start-up reported apart: a cluster is
                     started once, not per command)

Columns: wall seconds, slides per second, the ratio to ``local`` with the same N (Ray's
overhead, goal <= 1.10 at N=2), and the time from the start to the first finished slide
(tiling; the scheduling latency).

Then the embedding design (docs/scale_out.md), on the slides tiled above, Ray with max N,
a ViT-S/16 (the model each design loads once per worker or once per slide), each through
the same batch runner from cold workers:
  tasks, model cached   one task per slide; each worker process keeps the model loaded
                        across slides (histoscope's design)
  tasks, model per slide the same tasks loading the model for every slide
  actor pool            N actors holding the model, slides sent with ActorPool.map_unordered
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

TINY = {"depth": 4, "embed_dim": 192, "num_heads": 3}
DESIGN_ARCH = {"depth": 12, "embed_dim": 384, "num_heads": 6}  # ViT-S/16: loading it is what designs differ in


def _params(workers: int):
    from histoscope.pipeline.embed import EmbedParams

    return EmbedParams(encoder="uni", weights="random:0", arch=TINY, workers=workers, batch_size=32, dtype="fp32",
                       devices=("cpu",))


def _run(slides: Path, out: Path, workers: int, address: str | None) -> tuple[float, float]:
    """``histoscope run`` as a user runs it (a new process); returns its wall seconds and the
    seconds to its first finished slide (its first progress line)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "histoscope.cli.main", "run", str(slides), "--out", str(out), "--encoder", "uni",
           "--weights", "random:0", *[f"--arch={k}={v}" for k, v in TINY.items()], "--workers", str(workers),
           "--batch-size", "32", "--dtype", "fp32", "--devices", "cpu"]
    if address is not None:
        cmd += ["--executor", "ray", "--address", address]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    for line in proc.stderr:
        if first is None and line.startswith("tile 1/"):
            first = time.perf_counter() - start
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return time.perf_counter() - start, first


def _model_per_slide(job, *, out_dir, params):
    from histoscope.pipeline import embed

    embed._loaded.clear()  # forget the model this worker loaded for the last slide
    return embed.embed_slide_job(job, out_dir=out_dir, params=params)


def _designs(slides: Path, out: Path, head, workers: int, repeats: int) -> dict[str, float]:
    """Embedding of already-tiled slides by each design, fewest seconds of ``repeats`` turns."""
    import ray
    from ray.util import ActorPool

    from histoscope.pipeline import collect_slides, run_batch
    from histoscope.pipeline.embed import embed_slide_job
    from histoscope.pipeline.ray_executor import RayExecutor

    jobs = collect_slides([slides])

    def tasks(name: str, job_fn) -> float:
        params = replace(_params(workers), arch=DESIGN_ARCH, output_name=name)
        (out / f"features_{name}").mkdir(parents=True, exist_ok=True)
        with RayExecutor(address=head.address) as executor:  # a new Ray job: cold workers
            start = time.perf_counter()
            fn = functools.partial(job_fn, out_dir=str(out), params=params)
            assert run_batch(jobs, fn, out_dir=out / f"features_{name}", stage="embed", executor=executor,
                             progress=False).ok
            return time.perf_counter() - start

    def actors(name: str) -> float:
        params = replace(_params(workers), arch=DESIGN_ARCH, output_name=name)
        (out / f"features_{name}").mkdir(parents=True, exist_ok=True)
        with RayExecutor(address=head.address):

            @ray.remote(num_cpus=1)
            class Embedder:
                def run(self, job):
                    return embed_slide_job(job, out_dir=str(out), params=params)

            start = time.perf_counter()
            pool = ActorPool([Embedder.remote() for _ in range(workers)])
            records = list(pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs))
            assert all(r["status"] == "ok" for r in records), records
            return time.perf_counter() - start

    times: dict[str, float] = {}
    for turn in range(repeats):
        for label, run in (("tasks, model cached", lambda: tasks(f"cached{turn}", embed_slide_job)),
                           ("tasks, model per slide", lambda: tasks(f"per_slide{turn}", _model_per_slide)),
                           ("actor pool", lambda: actors(f"actors{turn}"))):
            times[label] = min(times.get(label, float("inf")), run())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="3072x2048")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="turns per figure; the fewest seconds count")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    counts = [int(v) for v in args.workers.split(",")]

    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline.ray_head import LoopbackHead

    root = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        for i in range(args.slides):
            make_sample_slide(root / "slides" / f"s{i}.svs", width=width, height=height, mpp=0.25, seed=100 + i)
        rows = []
        for n in counts:
            started = time.perf_counter()
            head = LoopbackHead(num_cpus=n).start()
            head_seconds = time.perf_counter() - started
            try:
                best: dict[str, tuple[float, float]] = {}
                for turn in range(args.repeats):  # local and ray take turns: a busy spell slows both
                    for name in ("local", "ray"):
                        out = root / f"{name}{n}_{turn}"
                        wall, first = _run(root / "slides", out, n, None if name == "local" else head.address)
                        if name not in best or wall < best[name][0]:
                            best[name] = (wall, first)
                rows.append((f"local {n}", n, *best["local"], None))
                rows.append((f"ray {n}", n, *best["ray"], head_seconds))
                if n == max(counts):
                    designs = _designs(root / "slides", root / f"ray{n}_0", head, n, args.repeats)
            finally:
                head.stop()
        local = {n: wall for name, n, wall, _, _ in rows if name.startswith("local")}
        print(f"\n{args.slides} slides {width}x{height} px at 0.25 µm/px, tile + embed (ViT {TINY}, CPU)")
        print(f"{'run':10} {'seconds':>8} {'slides/s':>9} {'vs local':>9} {'first slide s':>14} {'head start s':>13}")
        for name, n, wall, first, head_seconds in rows:
            head_text = f"{head_seconds:13.1f}" if head_seconds is not None else f"{'-':>13}"
            print(f"{name:10} {wall:8.1f} {args.slides / wall:9.3f} {wall / local[n]:9.2f} {first:14.2f} {head_text}")
        print(f"\nembedding design, Ray with {max(counts)} CPUs, {args.slides} slides already tiled")
        base = designs["tasks, model cached"]
        print(f"{'design':24} {'seconds':>8} {'vs tasks, cached':>17}")
        for name, seconds in designs.items():
            print(f"{name:24} {seconds:8.1f} {seconds / base:17.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
