"""The assistant: multi-turn chat with the KV cache kept across turns vs re-encoding the
conversation every turn, and the training step of stage 1 (LM frozen) vs stage 2 (LM trained).

Usage: python benchmarks/bench_chat.py [--turns 6] [--new-tokens 32] [--threads 1] [--steps 3]

Chat: a mid-size Llama-style decoder (8 layers, 512 wide, 8 heads; random weights) behind a
Perceiver resampler (64 latents) reading a 2,000-tile slide of 1,024-dim features; each turn
asks a question and decodes ``--new-tokens`` tokens greedily (the same answers either way,
checked). Per turn: time to first token (prefill + first step) and tokens/s of the answer.
  kept       Assistant.conversation([...]): the cache of the earlier turns is reused, a turn
             encodes only its question
  re-encode  Assistant.conversation([...], keep_cache=False): every turn encodes the whole
             conversation so far, image tokens included, then decodes
Training: one optimizer step (forward, backward, AdamW) on 8 conversations of ~160 tokens with
their slides (256 tiles), tiny (the chat_tiny recipe's model) and mid-size (as above):
  stage 1    LM frozen: only the resampler and projector learn
  stage 2    LM trained in full
  stage 2 lora  LoRA (r=8) on q/k/v/o
Times are this process's CPU seconds (``--threads 1`` makes them the work done, whatever
else the machine runs).
"""

from __future__ import annotations

import argparse
import time

import torch

from histoscope.language.chat import Assistant, apply_lora, build_chat_model, get_template, train_chat_tokenizer

MID = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 8}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}
WORDS = ("tumour stroma necrosis mitosis nucleus melanoma carcinoma nevus margin invasion grade lymphocyte "
         "epidermis dermis keratin gland duct vessel fibrosis atypia").split()


def _tokenizer(vocab_size: int):
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) + rng.choice(["", "s", "al", "ic"]) for _ in range(12)) for _ in range(2000)]
    return train_chat_tokenizer(get_template("llava_v1").texts() + texts, vocab_size=vocab_size)


def _model(tokenizer, lm: dict, *, image_dim: int, latents: int, resampler_dim: int):
    torch.manual_seed(0)
    config = {"model_type": "llama", "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **lm}
    return build_chat_model(image_dim=image_dim, lm_config=config, compressor="perceiver", num_image_tokens=latents,
                            resampler={"dim": resampler_dim, "depth": 2, "dim_head": 64, "heads": 8})


def bench_turns(args) -> None:
    tokenizer = _tokenizer(2000)
    model = _model(tokenizer, MID, image_dim=1024, latents=64, resampler_dim=512).eval()
    assistant = Assistant(model, tokenizer, get_template("llava_v1"), max_new_tokens=args.new_tokens)
    slide = torch.randn(2000, 1024)
    questions = [f"Question {i}: describe the {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i) % len(WORDS)]}?"
                 for i in range(args.turns)]
    calls: list[float] = []
    model.register_forward_hook(lambda *_: calls.append(time.process_time()))
    results = {}
    for mode, keep in (("kept", True), ("re-encode", False)):
        conversation = assistant.conversation([slide], keep_cache=keep)
        rows = []
        for question in questions:
            context = 0 if conversation.ids is None else int(conversation.mask.sum())
            calls.clear()
            start = time.process_time()
            answer = conversation.ask(question)[0]
            end = time.process_time()
            n = len(calls)  # one call per generated token (the first is the prefill)
            rows.append((calls[0] - start, (n - 1) / max(end - calls[0], 1e-9), context, answer))
        results[mode] = rows
    same = [a[3] for a in results["kept"]] == [a[3] for a in results["re-encode"]]
    print(f"\nmulti-turn chat, {args.turns} turns × {args.new_tokens} new tokens (same answers: {same})")
    print("| turn | tokens before the turn | TTFT kept (s) | TTFT re-encode (s) | ratio | tok/s kept | tok/s re-encode | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for turn, (kept, again) in enumerate(zip(results["kept"], results["re-encode"]), 1):
        print(f"| {turn} | {kept[2]} | {kept[0]:.3f} | {again[0]:.3f} | {again[0] / kept[0]:.1f}× "
              f"| {kept[1]:.1f} | {again[1]:.1f} | {kept[1] / again[1]:.2f}× |")


def _train_batch(tokenizer, k: int, *, turns: int = 4):
    template = get_template("llava_v1")
    rows, labels = [], []
    for i in range(8):
        qa = [(f"<image>\nWhat about the {WORDS[(i + t) % len(WORDS)]}?" if t == 0 else f"And the {WORDS[t]}?",
               " ".join(WORDS[(i * t + j) % len(WORDS)] for j in range(12))) for t in range(turns)]
        ids, lab = template.encode(tokenizer, qa, image_tokens=k)
        rows.append(ids)
        labels.append(lab)
    width = max(map(len, rows))
    ids = torch.full((8, width), tokenizer.pad_token_id)
    target = torch.full((8, width), -100)
    mask = torch.zeros(8, width, dtype=torch.long)
    for r, (i, lab) in enumerate(zip(rows, labels)):
        ids[r, :len(i)], target[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, target, mask


def _step_time(model, batch, features, steps: int) -> float:
    ids, target, mask = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = model(ids, mask, labels=target, image_embeds=model.image_tokens(features)).loss
        loss.backward()
        opt.step()
        times.append(time.process_time() - start)
    return min(times[1:])


def bench_training(args) -> None:
    print("\ntraining step (8 conversations with their slides)")
    print("| model | LM parameters | tokens/row | stage 1 (s) | stage 2 full (s) | ratio | stage 2 LoRA (s) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, lm, dim, vocab in (("tiny", TINY, 16, 400), ("mid", MID, 1024, 2000)):
        tokenizer = _tokenizer(vocab)
        features = torch.randn(8, 256, dim)
        times = []
        for mode in ("frozen", "full", "lora"):
            model = _model(tokenizer, lm, image_dim=dim, latents=8 if name == "tiny" else 64,
                           resampler_dim=32 if name == "tiny" else 512).train()
            if mode == "frozen":
                model.lm.requires_grad_(False)
            elif mode == "lora":
                apply_lora(model, r=8, alpha=16, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
            k = model.image_tokens(features[:1]).shape[1]
            batch = _train_batch(tokenizer, k)
            times.append(_step_time(model, batch, features, args.steps))
        lm_params = sum(p.numel() for p in model.base_lm.parameters())
        print(f"| {name} | {lm_params / 1e6:.1f} M | {batch[0].shape[1]} | {times[0]:.3f} | {times[1]:.3f} | "
              f"{times[1] / times[0]:.2f}× | {times[2]:.3f} | {times[2] / times[0]:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_turns(args)
    bench_training(args)


if __name__ == "__main__":
    main()
