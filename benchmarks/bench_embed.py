"""Feature-extraction throughput: the whole `embed` pipeline against the model alone.

Usage: python benchmarks/bench_embed.py [--models vit_small_patch16_224,vit_base_patch16_224] [--tiles 256]

For each model and dtype: img/s of the model's forward on in-memory tensors (the
ceiling), then img/s of `embed_slides` on a sample slide with the same batch size and
dtype (tile decoding and preprocessing in a worker process). The ratio says how much
of the I/O is hidden behind compute (goal >= 90%). Weights are explicitly random:
throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def forward_rate(encoder, batch: int, dtype: torch.dtype, seconds: float) -> float:
    x = torch.randn(batch, 3, 224, 224).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        encoder(x)  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            encoder(x)
            count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    from histoscope.pipeline.embed import EmbedParams, embed_slides, prepare_encoder
    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import LocalExecutor, tile_slides
    from histoscope.tiling import read_patches

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=192, help="tiles embedded per pipeline run")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    make_sample_slide(work / "slide.svs", width=16384, height=12288, mpp=0.25, tissue_fraction=0.6, seed=5)
    assert tile_slides([work / "slide.svs"], out_dir=work / "out", executor=LocalExecutor(workers=0), progress=False).ok
    coords, attrs = read_patches(work / "out" / "patches" / "slide_patches.h5")
    # Keep the first --tiles tiles so every configuration embeds the same work.
    import h5py

    with h5py.File(work / "out" / "patches" / "slide_patches.h5", "r+") as f:
        keep = f["coords"][: args.tiles]
        saved = dict(f["coords"].attrs)
        del f["coords"]
        ds = f.create_dataset("coords", data=keep)
        for k, v in saved.items():
            ds.attrs[k] = v
    tiles = min(args.tiles, len(coords))

    print(f"\n{torch.get_num_threads()} torch threads, batch {args.batch}, {tiles} tiles of 256 px at 0.5 µm/px "
          f"(resized to 224) from a 16k x 12k JPEG slide\n")
    print("| model | dtype | forward only (img/s) | embed pipeline (img/s) | pipeline / forward |")
    print("|---|---|---:|---:|---:|")
    for model in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            params = EmbedParams(encoder=f"timm:{model}", weights="random", batch_size=args.batch, workers=1,
                                 devices=("cpu",), dtype=dtype_name, output_name=f"{model}_{dtype_name}")
            encoder, compiled, dtype = prepare_encoder(params, torch.device("cpu"))
            ceiling = forward_rate(compiled, args.batch, dtype, args.seconds)
            result = embed_slides([work / "slide.svs"], out_dir=work / "out", params=params, progress=False)
            assert result.ok, result.records
            # Exclude the one-off model load: the pipeline's own record times the slide.
            seconds = result.records["slide"]["seconds"]
            rate = tiles / seconds
            print(f"| {model} | {dtype_name} | {ceiling:.1f} | {rate:.1f} | {rate / ceiling:.0%} |", flush=True)
            del encoder, compiled


if __name__ == "__main__":
    main()
