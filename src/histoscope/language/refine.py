"""HistoGPT's ensemble refinement: sample several reports of one slide, then have a
language model summarise them into one (``helpers/inference.ensemble_refinement``).

The reference samples ``num_samples`` reports one after another (top-k 40, top-p 0.95,
temperature 1), joins their token ids (each prompt + report, without the end token)
into one sequence, decodes it without its first token, prefixes an instruction and
sends it to GPT-4. Here the reports are sampled in one batch (the slide is encoded
once) and the summariser is whatever callable is given — a chat model, an API client,
or nothing but a test double; nothing here talks to a network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from histoscope.language.histogpt import HistoGPT

__all__ = ["DEFAULT_INSTRUCTION", "Refinement", "ensemble_refinement"]

DEFAULT_INSTRUCTION = "Summarize the following text. Be as accurate as possible!"  # the reference's


@dataclass
class Refinement:
    """``summary`` from the summariser; ``prompt`` what it was given; ``reports`` the
    sampled sequences (prompt + report ids, end token dropped), one per sample."""

    summary: str
    prompt: str
    reports: list[Tensor]


def ensemble_refinement(model: HistoGPT, input_ids: Tensor, features: Tensor, mask: Tensor | None = None, *,
                        decode: Callable[[list[int]], str], summarize: Callable[[str], str], num_samples: int = 10,
                        max_new_tokens: int = 256, top_k: int | None = 40, top_p: float | None = 0.95,
                        temperature: float = 1.0, seed: int | None = None,
                        instruction: str = DEFAULT_INSTRUCTION) -> Refinement:
    """Sample ``num_samples`` reports of one slide and summarise them.

    Parameters
    ----------
    model : HistoGPT
    input_ids : Tensor
        The prompt ``(1, T)`` (e.g. the tokenised "Final diagnosis:").
    features, mask : Tensor
        One slide, ``(1, N, D)`` and optionally ``(1, N)``.
    decode : callable
        Token ids → text (e.g. ``tokenizer.decode``).
    summarize : callable
        Instruction + reports → the refined report.
    num_samples, max_new_tokens, top_k, top_p, temperature, seed
        Sampling settings; the defaults are the reference's.
    instruction : str
        Put in front of the decoded reports.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or features.shape[0] != 1:
        raise ValueError("ensemble_refinement takes one prompt (1, T) and one slide (1, N, D)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    samples = model.generate(input_ids.expand(num_samples, -1), features, mask, max_new_tokens=max_new_tokens,
                             do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
    end = model.config.eos_token_id
    ends = {end} if isinstance(end, int) else set(end or ())
    reports = []
    for row in samples:
        generated = row[input_ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(generated) if t in ends), len(generated))
        reports.append(row[:input_ids.shape[1] + stop])  # the reference stops before the end token
    prompt = instruction + decode(torch.cat(reports).tolist()[1:])
    return Refinement(summary=summarize(prompt), prompt=prompt, reports=reports)
