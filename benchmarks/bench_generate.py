"""HistoGPT report generation: KV-cached ``model.generate`` against the reference's way.

Usage: python benchmarks/bench_generate.py [--new-tokens 128 256] [--tiles 2000] [--slides 8]
       [--resampler-dim 512] [--device cpu] [--dtype float32] [--threads N]
       [--train-slides 4] [--report-tokens 128]

One model throughout, random weights with the cross-attention gates opened (0.5, as in a
trained model, so the slide changes the text): CTransPath-sized features (``--tiles`` × 768),
the Perceiver resampler with 640 latents (6 layers, ``--resampler-dim`` wide, 64-wide heads),
and an 8-layer, 512-wide BioGPT (8 heads, 2048 feed-forward, the 42,384-token vocabulary).
The published resampler is 1536 wide: pass ``--resampler-dim 1536`` (16 heads of 96); it makes
the reference's way slower still, so the default understates the ratio.

Rows, each case in a fresh subprocess:
  reference   the reference's ``generate()`` with arg-max: the whole model, resampler
              included, on the whole sequence for every new token (one run, timed at
              each ``--new-tokens`` mark)
  cached      ``model.generate``: latents and cross-attention keys/values once per slide,
              a KV cache for self-attention
  batched     ``--slides`` slides of different tile counts (the largest ``--tiles``) in one
              ``model.generate`` call, padded, vs one call per slide
  train step  one stage-2 training step (teacher-forced loss on ``--report-tokens`` report
              tokens, backward, AdamW) on ``--train-slides`` slides, as published (cross-attention
              blocks and exit gate trained; resampler and BioGPT frozen) vs BioGPT unfrozen;
              the mean of 3 steps after one warm-up step; its peak memory is the whole
              process's (weights, gradients, optimizer state and activations)
Greedy decoding, ``eos_token_id=None`` (every run writes exactly the asked number of
tokens); the ids of every pair are compared. Times are the process's CPU seconds on CPU
(``--threads 1`` makes them the work done, whatever else the machine runs), wall-clock
seconds on CUDA. Peak memory: the most resident memory
(sampled every 2 ms; on CUDA ``max_memory_allocated``) above what the process held
before the generation call, i.e. the working memory of the generation itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

LM = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 2048}
PROMPT = [2, 1480, 1164, 30]  # four tokens, starting with </s> as BioGPT's tokenizer does


class _PeakRSS:
    """Highest resident set size (bytes) seen while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import os

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _case(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from histoscope.language import load_report_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dim_head = 96 if args.resampler_dim == 1536 else 64  # the published resampler: 16 heads of 96
    resampler = {"dim_model": args.resampler_dim, "dim_head": dim_head, "num_heads": args.resampler_dim // dim_head,
                 "num_layers": 6, "num_latents": 640, "dim_feats": 768}
    model = load_report_model("histogpt", lm_config=LM, resampler_config=resampler).eval()
    with torch.no_grad():
        for layer in model.fusion_layers:
            layer.block.attn_gate.fill_(0.5)
            layer.block.ff_gate.fill_(0.5)
    model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    counts = [args.tiles - i * args.tiles // (2 * args.slides) for i in range(args.slides)]
    slides = [torch.randn(1, n, 768, generator=gen).to(device=device, dtype=dtype) for n in counts]
    prompt = torch.tensor([PROMPT], device=device)
    result: dict = {}
    # CPU: the process's CPU time, which other jobs on a shared machine do not inflate
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with _PeakRSS() as rss, torch.inference_mode():
            start = clock()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = clock() - start
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.peak - rss.start
        return out, seconds, peak

    if kind == "reference":
        marks = sorted(args.new_tokens)

        def run():
            ids, times, start = prompt, {}, clock()
            for step in range(1, marks[-1] + 1):
                logits = model(ids, slides[0]).logits[:, -1]  # resampler, exit gate, whole decoder
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                if step in marks:
                    times[step] = clock() - start
            return ids, times

        (ids, times), _, peak = timed(run)
        result = {"ids": ids[0].tolist(), "times": times, "peak": peak}
    elif kind == "cached":
        ids, seconds, peak = timed(lambda: model.generate(prompt, slides[0], max_new_tokens=args.n,
                                                          eos_token_id=None))
        result = {"ids": ids[0].tolist(), "seconds": seconds, "peak": peak}
    elif kind == "batched":
        features = torch.zeros(len(slides), max(counts), 768, device=device, dtype=dtype)
        mask = torch.zeros(len(slides), max(counts), dtype=torch.bool, device=device)
        for b, s in enumerate(slides):
            features[b, :s.shape[1]], mask[b, :s.shape[1]] = s[0], True
        prompts = prompt.expand(len(slides), -1)
        ids, seconds, peak = timed(lambda: model.generate(prompts, features, mask, max_new_tokens=args.n,
                                                          eos_token_id=None))
        result = {"ids": ids.tolist(), "seconds": seconds, "peak": peak}
    elif kind in ("train_frozen", "train_lm"):
        result = _train_step(model, slides, train_lm=kind == "train_lm", args=args, clock=clock)
    elif kind == "singles":
        ids, seconds, peak = timed(lambda: [model.generate(prompt, s, max_new_tokens=args.n, eos_token_id=None)[0]
                                            for s in slides])
        result = {"ids": [i.tolist() for i in ids], "seconds": seconds, "peak": peak}
    return result


def _train_step(model, slides, *, train_lm: bool, args: argparse.Namespace, clock) -> dict:
    """Seconds and peak memory of a stage-2 training step (``histoscope train-report``'s)."""
    import torch

    from histoscope.train.report.run import trainable_parameters

    device = slides[0].device
    trainable_parameters(model, train_resampler=False, train_lm=train_lm)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n = min(args.train_slides, len(slides))
    features = torch.zeros(n, args.tiles, 768, device=device, dtype=slides[0].dtype)
    mask = torch.zeros(n, args.tiles, dtype=torch.bool, device=device)
    for b in range(n):
        features[b, :slides[b].shape[1]], mask[b, :slides[b].shape[1]] = slides[b][0], True
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, model.config.vocab_size, (n, len(PROMPT) + args.report_tokens), generator=gen).to(device)
    ids[:, :len(PROMPT)] = torch.tensor(PROMPT, device=device)
    labels = ids.clone()
    labels[:, :len(PROMPT)] = -100  # the loss is on the report only

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, features, mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: optimizer state allocated
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _PeakRSS() as rss:
        start = clock()
        for _ in range(3):
            step()
        seconds = (clock() - start) / 3
    # the whole footprint (weights, gradients, optimizer state, activations): what training needs
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": seconds, "peak": peak, "trained": trained}


def _run(kind: str, args: argparse.Namespace, n: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", kind, "--n", str(n or 0), "--tiles", str(args.tiles),
           "--slides", str(args.slides), "--resampler-dim", str(args.resampler_dim), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--train-slides", str(args.train_slides),
           "--report-tokens", str(args.report_tokens), "--new-tokens", *map(str, args.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--resampler-dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--train-slides", type=int, default=4, help="slides per stage-2 training step")
    parser.add_argument("--report-tokens", type=int, default=128, help="report tokens per slide in a training step")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = _case(args.case, args)
        result["times"] = {str(k): v for k, v in result.get("times", {}).items()}
        print(json.dumps(result))
        return

    print(f"HistoGPT generation: {args.tiles} tiles x 768, 640 latents (resampler {args.resampler_dim} wide), "
          f"BioGPT 8 x 512; {args.device} {args.dtype}"
          f"{f', {args.threads} threads' if args.threads else ''}; greedy, no early stop", flush=True)
    reference = _run("reference", args)
    rows = []
    for n in sorted(args.new_tokens):
        cached = _run("cached", args, n)
        ref_ids, ref_time = reference["ids"][:len(PROMPT) + n], reference["times"][str(n)]
        rows.append((f"1 slide, {n} new tokens", "reference (full forward per token)", ref_time,
                     "cached generate", cached["seconds"], cached["ids"] == ref_ids,
                     f"{_mib(reference['peak'])} / {_mib(cached['peak'])}"))
    n = min(args.new_tokens)
    batched, singles = _run("batched", args, n), _run("singles", args, n)
    rows.append((f"{args.slides} slides, {n} new tokens", f"{args.slides} single-slide calls", singles["seconds"],
                 "one batched call", batched["seconds"],
                 batched["ids"] == singles["ids"],
                 f"{_mib(singles['peak'])} / {_mib(batched['peak'])}"))

    unit = "s" if args.device.startswith("cuda") else "CPU s"
    header = ("case", "baseline", unit, "ours", unit, "speed-up", "same ids", "peak memory (baseline / ours)")
    table = [header] + [(case, base, f"{bt:.2f}", ours, f"{ot:.2f}", f"{bt / ot:.1f}x", "yes" if same else "NO", mem)
                        for case, base, bt, ours, ot, same, mem in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))

    frozen, unfrozen = _run("train_frozen", args), _run("train_lm", args)
    print(f"\nstage-2 training step: {min(args.train_slides, args.slides)} slides x {args.tiles} tiles, "
          f"{args.report_tokens} report tokens each, AdamW")
    header = ("setting", "trained parameters", f"{unit} / step", "vs unfrozen", "peak memory (process)")
    table = [header] + [(name, f"{r['trained']:,}", f"{r['seconds']:.2f}", f"{unfrozen['seconds'] / r['seconds']:.2f}x",
                         _mib(r["peak"]))
                        for name, r in (("BioGPT unfrozen (train_lm=true)", unfrozen),
                                        ("as published: BioGPT frozen", frozen))]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
