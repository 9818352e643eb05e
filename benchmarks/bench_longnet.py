"""LongNet dilated attention vs dense attention: time and peak memory against sequence length.

Usage: python benchmarks/bench_longnet.py [--tokens 10000 50000 100000] [--dense-max 50000] [--no-encoder]

Rows, each case in a fresh subprocess (peak memory = the process's peak RSS, ru_maxrss):
  dilated layer   one Prov-GigaPath attention layer (768-d, 16 heads, the published
                  branches (1024,1) (5792,2) (32768,4) (185363,8) (1048576,16)):
                  q/k/v projections, dilated attention, inner LayerNorm, out_proj
  dense layer     the same layer with dense ``scaled_dot_product_attention`` over all
                  tokens (PyTorch's CPU flash kernel: memory O(N), time O(N²))
  encoder         the whole 12-layer ``gigapath_slide`` forward on (1, N, 1536) tiles
Dense is measured up to ``--dense-max`` tokens and extrapolated quadratically beyond (marked ~).
Inference mode, float32, all cores torch uses by default; one warm-up at 2,048 tokens first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WIDTH, HEADS = 768, 16


def _case(kind: str, tokens: int) -> dict[str, float]:
    import resource

    import torch
    import torch.nn.functional as F

    from histoscope.layers.dilated_attention import DilatedAttention
    from histoscope.slide import load_slide_model
    from histoscope.slide.models.longnet import PUBLISHED_DILATION_RATIOS, PUBLISHED_SEGMENT_LENGTHS

    torch.manual_seed(0)
    if kind == "encoder":
        model = load_slide_model("gigapath_slide", in_dim=1536).eval()

        def make(n):
            return torch.randn(1, n, 1536), torch.randint(0, 400, (1, n, 2)) * 256

        def run(inputs):
            return model(*inputs).embedding
    else:
        layer = DilatedAttention(dim=WIDTH, num_heads=HEADS, segment_lengths=PUBLISHED_SEGMENT_LENGTHS,
                                 dilation_ratios=PUBLISHED_DILATION_RATIOS).eval()

        def make(n):
            return torch.randn(1, n, WIDTH)

        def dense(x):
            shape = (1, x.shape[1], HEADS, WIDTH // HEADS)
            q, k, v = (p(x).view(shape).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            return layer.out_proj(layer.inner_attn_ln(out))

        run = layer if kind == "dilated" else dense

    with torch.inference_mode():
        run(make(2048))  # warm-up: kernels, thread pool
        inputs = make(tokens)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run(inputs)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mb": peak / 1024, "delta_mb": max(peak - before, 0) / 1024}


def _measure(kind: str, tokens: int) -> dict[str, float]:
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    code = f"import json, bench_longnet as b; print(json.dumps(b._case({kind!r}, {tokens})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=__file__.rsplit("/", 1)[0], check=False)
    if result.returncode:
        raise RuntimeError(f"{kind} at {tokens} tokens failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dense-max", type=int, default=50_000, help="largest N dense is run at")
    parser.add_argument("--no-encoder", action="store_true", help="skip the 12-layer encoder rows")
    args = parser.parse_args()

    rows, dense_fit = [], None
    for n in args.tokens:
        dilated = _measure("dilated", n)
        print(f"dilated {n}: {dilated}", file=sys.stderr, flush=True)
        if n <= args.dense_max:
            dense = _measure("dense", n)
            dense_fit = (n, dense)
            measured = True
            print(f"dense {n}: {dense}", file=sys.stderr, flush=True)
        else:
            n0, d0 = dense_fit
            dense = {"seconds": d0["seconds"] * (n / n0) ** 2, "peak_mb": float("nan"), "delta_mb": float("nan")}
            measured = False
        encoder = None if args.no_encoder else _measure("encoder", n)
        if encoder:
            print(f"encoder {n}: {encoder}", file=sys.stderr, flush=True)
        rows.append((n, dilated, dense, measured, encoder))

    print("| tokens | dilated layer s | dilated peak MB (Δ) | dense layer s | dense peak MB (Δ) | speed-up "
          "| encoder 12 layers s | encoder peak MB (Δ) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, dil, den, measured, enc in rows:
        mark = "" if measured else "~"
        dense_mem = f"{den['peak_mb']:.0f} ({den['delta_mb']:.0f})" if measured else "n/a"
        enc_cols = (f"{enc['seconds']:.1f} | {enc['peak_mb']:.0f} ({enc['delta_mb']:.0f})" if enc else "– | –")
        print(f"| {n:,} | {dil['seconds']:.2f} | {dil['peak_mb']:.0f} ({dil['delta_mb']:.0f}) | "
              f"{mark}{den['seconds']:.1f} | {dense_mem} | {mark}{den['seconds'] / dil['seconds']:.1f}× | {enc_cols} |")
    if any(not r[3] for r in rows):
        print(f"\n~ dense extrapolated as t({dense_fit[0]:,}) · (N / {dense_fit[0]:,})², not run.")


if __name__ == "__main__":
    main()
