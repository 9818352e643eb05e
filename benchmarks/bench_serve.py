"""Deep Zoom tile latency of `histoscope serve` against OpenSlide's DeepZoomGenerator, in the same run.

Usage: python benchmarks/bench_serve.py [--size 16384] [--tiles-per-level 144] [--clients 8] [--rounds 3]
                                        [--cache benchmarks/.cache]

Both servers run in their own process on loopback, with the same stack (FastAPI + uvicorn, tiles
made in its thread pool) and the same Deep Zoom parameters (254-px tiles, overlap 1, JPEG quality
75); only the tile maker differs:

  histoscope      histoscope.serve.create_app: the fast TIFF path, the coarsest pyramid level fine
                  enough, area shrink, libjpeg-turbo encoding
  openslide       openslide.deepzoom.DeepZoomGenerator(OpenSlide(path)).get_tile + PIL JPEG, as
                  OpenSlide's own deepzoom_server example serves tiles

8 client threads (one keep-alive connection each) take the next request from one shared list,
the same list in the same order for both servers, from the four finest Deep Zoom levels (level 0
of the slide, its 2× shrink, its level at downsample 4 and the 2× shrink of that), in two
workloads, each on freshly started servers:

  viewer      screens of 4 × 3 adjacent tiles at a random place and level, in turn, as
              OpenSeadragon asks for them (a screen's tiles go to different clients at once)
  scattered   single tiles at random places: no two requests share stored tiles

Every tile is asked for once ("cold": nothing comes from histoscope's encoded-tile cache); then
the viewer list is asked for again ("revisit", a viewer panning back): histoscope answers from
its cache, DeepZoomGenerator makes the tiles again. Latency is per request, measured by the client,
pooled over --rounds rounds (new tiles each round; the servers take turns, so a busy spell of a
shared machine falls on both); the server's CPU time per tile (user + system, all its threads) is
what the tile costs whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _openslide_app(slide_path: Path):
    """OpenSlide's DeepZoomGenerator behind the same FastAPI stack."""
    from io import BytesIO

    import openslide
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response
    from openslide.deepzoom import DeepZoomGenerator

    generator = DeepZoomGenerator(openslide.OpenSlide(str(slide_path)), tile_size=254, overlap=1)
    app = FastAPI()

    @app.get("/dzi/{slide_id}_files/{level}/{col}_{row}.jpeg")
    def tile(slide_id: str, level: int, col: int, row: int) -> Response:
        try:
            image = generator.get_tile(level, (col, row))
        except ValueError:
            raise HTTPException(404) from None
        buffer = BytesIO()
        image.save(buffer, "jpeg", quality=75)
        return Response(buffer.getvalue(), media_type="image/jpeg")

    return app


def _serve(kind: str, slide_path: Path, port: int) -> None:
    import uvicorn

    if kind == "histoscope":
        from histoscope.serve.app import create_app

        out = slide_path.parent / "bench_serve_out"
        out.mkdir(exist_ok=True)
        app = create_app(out, [slide_path.parent], rate=0)
    else:
        app = _openslide_app(slide_path)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(kind: str, slide_path: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--slide", str(slide_path), "--port",
                             str(port)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def _run_clients(port: int, paths: list[str], clients: int) -> np.ndarray:
    """Latency in ms of every request, ``clients`` threads taking the next path in turn."""
    latencies = np.zeros(len(paths))
    next_index = iter(range(len(paths)))
    lock = threading.Lock()
    failures = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            start = time.perf_counter()
            conn.request("GET", paths[i])
            response = conn.getresponse()
            body = response.read()
            latencies[i] = (time.perf_counter() - start) * 1000
            if response.status != 200 or not body:
                failures.append((paths[i], response.status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[:3]}")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="level-0 width (height is 3/4 of it)")
    parser.add_argument("--tiles-per-level", type=int, default=144)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both servers in turn (pooled)")
    parser.add_argument("--serve", choices=["histoscope", "openslide"], help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return _serve(args.serve, args.slide, args.port)

    from histoscope.io.sample import make_sample_slide
    from histoscope.serve.deepzoom import DeepZoomGeometry

    folder = args.cache / "bench_serve"
    folder.mkdir(parents=True, exist_ok=True)
    width, height = args.size, args.size * 3 // 4
    slide_path = folder / f"serve_{width}.svs"
    if not slide_path.exists():
        print(f"writing {slide_path} ...", flush=True)
        make_sample_slide(slide_path, width=width, height=height, mpp=0.25, kind="svs", downsamples=(1, 4, 16))
    slide_path.read_bytes()  # into the page cache, for both servers alike

    geometry = DeepZoomGeometry(width, height)
    top = geometry.level_count - 1
    levels = [top, top - 1, top - 2, top - 3]
    cols, rows = geometry.level_tiles(top - 4)
    warmup = [_url(slide_path, top - 4, c, r) for c in range(cols) for r in range(rows)][:8]  # asked by no workload

    # (kind, workload) -> pooled latencies (ms), levels, wall seconds, server CPU seconds
    results: dict[tuple[str, str], list] = {}
    for round_ in range(args.rounds):
        rng = random.Random(args.seed + round_)
        workloads = _workloads(geometry, slide_path, levels, args.tiles_per_level, rng)
        for workload, tiles in workloads.items():
            urls = [path for _, path in tiles]
            kinds = ("openslide", "histoscope") if round_ % 2 == 0 else ("histoscope", "openslide")
            for kind in kinds:
                proc, port = _start(kind, slide_path)
                try:
                    _run_clients(port, [path for _, path in warmup] * 2, args.clients)  # imports, pool, decoders
                    passes = [workload, "revisit"] if workload == "viewer" else [workload]
                    for name in passes:
                        cpu, start = _cpu_seconds(proc.pid), time.perf_counter()
                        latencies = _run_clients(port, urls, args.clients)
                        entry = results.setdefault((kind, name), [[], [], 0.0, 0.0])
                        entry[0].append(latencies)
                        entry[1].append(np.array([level for level, _ in tiles]))
                        entry[2] += time.perf_counter() - start
                        entry[3] += _cpu_seconds(proc.pid) - cpu
                finally:
                    proc.terminate()
                    proc.wait(30)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    counts = {name: sum(len(lat) for lat in results["histoscope", name][0]) for name in ("viewer", "scattered")}
    print(f"\n{width} x {height} px SVS (levels 1, 4, 16), Deep Zoom levels {levels}, {args.clients} concurrent "
          f"clients, {args.rounds} rounds (servers in turn, fresh for each workload); {counts['viewer']} viewer "
          f"tiles in screens of 4 x 3, {counts['scattered']} scattered tiles\n")
    print("| workload | server | p50 (ms) | p95 (ms) | tiles/s | server CPU ms/tile | p95: OpenSlide / histoscope "
          "| CPU/tile: OpenSlide / histoscope |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("viewer", "scattered", "revisit"):
        figures = {}
        for kind in ("openslide", "histoscope"):
            lat, _, wall, cpu = results[kind, name]
            lat = np.concatenate(lat)
            figures[kind] = (np.percentile(lat, 50), np.percentile(lat, 95), len(lat) / wall, cpu / len(lat) * 1000)
        for kind, label in (("openslide", "OpenSlide DeepZoomGenerator"), ("histoscope", "histoscope serve")):
            p50, p95, rate, cpu = figures[kind]
            ratios = ("baseline", "baseline") if kind == "openslide" else (
                f"{figures['openslide'][1] / p95:.2f}×", f"{figures['openslide'][3] / cpu:.2f}×")
            print(f"| {name} | {label} | {p50:.1f} | {p95:.1f} | {rate:.0f} | {cpu:.1f} | {ratios[0]} | {ratios[1]} |")
    print("\np95 (ms) per Deep Zoom level, cold viewer workload:\n")
    print("| level | read from | OpenSlide | histoscope | ratio |")
    print("| ---: | --- | ---: | ---: | ---: |")
    sources = {top: "level 0", top - 1: "level 0, shrunk 2×", top - 2: "level 1 (4×)", top - 3: "level 1, shrunk 2×"}
    pooled = {kind: (np.concatenate(results[kind, "viewer"][0]), np.concatenate(results[kind, "viewer"][1]))
              for kind in ("openslide", "histoscope")}
    for level in levels:
        a = np.percentile(pooled["openslide"][0][pooled["openslide"][1] == level], 95)
        b = np.percentile(pooled["histoscope"][0][pooled["histoscope"][1] == level], 95)
        print(f"| {level} | {sources[level]} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")


def _url(slide_path: Path, level: int, col: int, row: int) -> tuple[int, str]:
    return level, f"/dzi/{slide_path.stem}_files/{level}/{col}_{row}.jpeg"


def _workloads(geometry, slide_path: Path, levels: list[int], per_level: int, rng: random.Random) -> dict:
    """``viewer``: screens of 4 x 3 adjacent tiles, shuffled, each tile once; ``scattered``: single tiles."""
    screens = []
    for level in levels:
        cols, rows = geometry.level_tiles(level)
        for _ in range(max(1, per_level // 12)):
            c0, r0 = rng.randrange(max(1, cols - 3)), rng.randrange(max(1, rows - 2))
            screens.append([_url(slide_path, level, c, r)
                            for r in range(r0, min(rows, r0 + 3)) for c in range(c0, min(cols, c0 + 4))])
    rng.shuffle(screens)
    scattered = []
    for level in levels:
        cols, rows = geometry.level_tiles(level)
        addresses = rng.sample([(c, r) for c in range(cols) for r in range(rows)], min(per_level, cols * rows))
        scattered += [_url(slide_path, level, c, r) for c, r in addresses]
    rng.shuffle(scattered)
    return {"viewer": list(dict.fromkeys(t for screen in screens for t in screen)), "scattered": scattered}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

if __name__ == "__main__":
    main()
