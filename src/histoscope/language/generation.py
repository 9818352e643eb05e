"""KV-cached decoding (greedy, sampling, beam search) for Hugging Face-style causal LMs.

Notation: B prompts, K beams, T tokens so far (prompt + generated), V vocabulary.

The loop only needs the public call convention of a ``transformers`` causal LM::

    out = model(input_ids=(B, t), attention_mask=(B, T), position_ids=(B, t),
                cache=<cache or None>, use_cache=True)     # ``past_key_values=`` before 5.x
    out.logits  # (B, t, V);  out.cache / out.past_key_values: the cache to pass back

so it serves any such model (a chat LM as well as HistoGPT, whose slide conditioning
is set up by its own ``generate`` before it calls in here). The cache is prefilled
with the whole prompt once, then each step feeds one token per row.

Batches of prompts of different lengths are **left-padded** (``attention_mask`` 0 on
the left; :func:`left_pad` builds both); each row's positions count its real tokens
only, so a padded row decodes as it would alone. Outputs follow the Hugging Face
convention: prompt and new tokens ``(B, T + n)``, a finished row keeps its end token
and is filled with ``pad_token_id`` after it, and decoding stops early once every row
has finished (never, with ``eos_token_id=None``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DecodeState", "beam_search", "filter_logits", "generate", "greedy_or_sample", "left_pad"]


def left_pad(sequences: Sequence[Sequence[int]], *, pad_token_id: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token-id lists of different lengths → ``input_ids (B, T)`` and ``attention_mask (B, T)``,
    padded on the left (what :func:`generate` expects)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one prompt and no empty prompt (start with the BOS token)")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long, device=device)
        mask[row, width - len(seq):] = 1
    return ids, mask


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the ``top_k`` largest logits of each row, then the smallest set whose
    probability reaches ``top_p`` (at least one token); the rest become ``-inf``.

    ``logits (B, V)``. ``top_k`` None/0 and ``top_p`` None/1.0 switch a filter off.
    """
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = mass_before >= top_p  # the first token always has 0 before it, so it is kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@dataclass
class _Step:
    """One call convention of a Hugging Face causal LM, found once from its signature."""

    model: nn.Module
    use_cache: bool
    cache_kwarg: str
    pass_positions: bool

    @classmethod
    def of(cls, model: nn.Module, use_cache: bool) -> _Step:
        params = inspect.signature(model.forward).parameters
        return cls(model, use_cache, "cache" if "cache" in params else "past_key_values", "position_ids" in params)

    def __call__(self, ids: Tensor, mask: Tensor, cache, new: int) -> tuple[Tensor, object]:
        """Logits ``(B, V)`` for the next token, given all ``ids (B, T)`` and ``mask (B, T)``;
        ``new`` is how many of the last ids the cache has not seen (all, without a cache)."""
        kwargs = {"attention_mask": mask}
        if self.use_cache:
            ids = ids[:, -new:]
            kwargs.update({self.cache_kwarg: cache, "use_cache": True})
        else:
            kwargs["use_cache"] = False
        if self.pass_positions:
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # (B, T): each row counts its real tokens
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, **kwargs)
        if not self.use_cache:
            return out.logits[:, -1].float(), None
        cache = getattr(out, "cache", None)  # transformers ≥ 5.2x; ``past_key_values`` before
        return out.logits[:, -1].float(), cache if cache is not None else out.past_key_values


@dataclass
class DecodeState:
    """A KV cache carried from one :func:`greedy_or_sample` call to the next (multi-turn chat).

    ``cache`` holds the keys/values of the first ``length`` tokens of the ids the call
    ended with (all but the last token, which no step has fed yet). A call given a state
    with a cache feeds only the ids after them, so a conversation's earlier turns are
    never recomputed; the caller passes the whole conversation's ``input_ids`` and
    ``attention_mask``, which may then have 0s between turns (a batch's rows that
    finished early, padded).
    """

    cache: object = None
    length: int = 0


def _end_tokens(eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> tuple[list[int], int]:
    """End-token ids as a list, and the pad id (default: the first end token, else 0)."""
    eos = [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) else list(eos_token_id)
    return eos, pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)


def _check_prompt(input_ids: Tensor, attention_mask: Tensor | None, *, continuing: bool = False) -> Tensor:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with T ≥ 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if continuing:  # a conversation's earlier turns may hold padding between them
        if not mask[:, -1].all():
            raise ValueError("the last token of every row must be a real one (attention_mask 1)")
        return mask
    if (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError("prompts must be left-padded (attention_mask 0…0 1…1 in every row); "
                         "build them with histoscope.language.generation.left_pad")
    return mask


@torch.no_grad()
def greedy_or_sample(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                     seed: int | None = None, use_cache: bool = True, state: DecodeState | None = None) -> Tensor:
    """Greedy decoding, or sampling with temperature / top-k / top-p.

    Parameters
    ----------
    model : nn.Module
        A causal LM following the call convention in the module docstring.
    input_ids, attention_mask : Tensor
        Left-padded prompts ``(B, T)``.
    max_new_tokens : int
        Upper bound n on the generated length.
    do_sample : bool
        Sample from the filtered distribution instead of taking the arg-max.
    temperature, top_k, top_p
        Sampling controls (applied in that order, as Hugging Face does).
    eos_token_id : int or sequence of int, optional
        A row stops after producing one of these; None never stops early.
    pad_token_id : int, optional
        Fills finished rows; defaults to the first end token.
    seed : int, optional
        Seeds a private generator, so sampling is reproducible and leaves the global RNG alone.
    use_cache : bool
        False recomputes the whole sequence every step (for checking the cache).
    state : DecodeState, optional
        Continue from (and update) a cache kept across calls; see :class:`DecodeState`.

    Returns
    -------
    Tensor
        ``(B, T + n')`` token ids, ``n' ≤ max_new_tokens``.
    """
    continuing = state is not None and state.cache is not None
    if continuing and not 0 < state.length < input_ids.shape[1]:
        raise ValueError(f"the cache covers {state.length} tokens; input_ids must extend them, got "
                         f"{input_ids.shape[1]} tokens")
    mask = _check_prompt(input_ids, attention_mask, continuing=continuing)
    eos, pad = _end_tokens(eos_token_id, pad_token_id)
    eos = torch.as_tensor(eos, dtype=torch.long, device=input_ids.device) if eos else None
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    step = _Step.of(model, use_cache or state is not None)
    ids, cache, new = input_ids, None, input_ids.shape[1]
    if continuing:
        cache, new = state.cache, input_ids.shape[1] - state.length
    running = torch.ones(len(ids), dtype=torch.bool, device=ids.device)  # (B,)
    for _ in range(max_new_tokens):
        logits, cache = step(ids, mask, cache, new)  # (B, V)
        if do_sample:
            logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
        else:
            token = logits.argmax(-1)
        token = torch.where(running, token, torch.full_like(token, pad))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        new = 1
        if eos is not None:
            running &= ~torch.isin(token, eos)
            if not running.any():
                break
    if state is not None and ids.shape[1] > input_ids.shape[1]:
        state.cache, state.length = cache, ids.shape[1] - 1
    return ids


def _reorder_cache(cache, index: Tensor):
    """Select cache rows ``index`` (beam search); Hugging Face ``Cache`` objects in place,
    legacy tuples of ``(key, value)`` per layer rebuilt."""
    if cache is None:
        return None
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)


@torch.no_grad()
def beam_search(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
                num_beams: int, length_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                pad_token_id: int | None = None, use_cache: bool = True) -> Tensor:
    """Beam search; returns the best finished beam of each prompt, ``(B, T + n')``.

    A beam that produces an end token is finished, with score (sum of token
    log-probabilities) / (generated length ** ``length_penalty``); a prompt is done once
    it has ``num_beams`` finished beams that no running beam can beat (Hugging Face's
    ``early_stopping=False`` rule). Beams still running at ``max_new_tokens`` are
    scored the same way. The other arguments are as in :func:`greedy_or_sample`.
    """
    mask = _check_prompt(input_ids, attention_mask)
    if max_new_tokens == 0:
        return input_ids
    eos, pad = _end_tokens(eos_token_id, pad_token_id)
    batch, k, prompt_len = input_ids.shape[0], num_beams, input_ids.shape[1]
    step = _Step.of(model, use_cache)
    ids = input_ids.repeat_interleave(k, dim=0)  # (B·K, T), beams of a prompt adjacent
    mask = mask.repeat_interleave(k, dim=0)
    scores = torch.zeros(batch, k, device=ids.device)
    scores[:, 1:] = float("-inf")  # the K copies are identical: expand only the first at step 1
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache, new = None, prompt_len
    for generated in range(1, max_new_tokens + 1):
        logits, cache = step(ids, mask, cache, new)
        logp = logits.log_softmax(-1)  # (B·K, V)
        vocab = logp.shape[-1]
        candidates = (scores.reshape(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=-1)  # (B, 2K): enough to refill K beams past K ends
        next_beam = torch.zeros(batch, k, dtype=torch.long, device=ids.device)
        next_token = torch.full((batch, k), pad, dtype=torch.long, device=ids.device)
        next_score = torch.zeros(batch, k, device=ids.device)
        for b in range(batch):
            if done[b]:
                continue
            slot = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                beam, token = divmod(index, vocab)
                if token in eos:
                    if rank < k:  # an end token outside the top K would never have been chosen
                        hyp = torch.cat([ids[b * k + beam], ids.new_tensor([token])])
                        _add_hypothesis(finished[b], k, score / generated**length_penalty, hyp)
                    continue
                next_beam[b, slot], next_token[b, slot], next_score[b, slot] = beam, token, score
                slot += 1
                if slot == k:
                    break
            best_running = next_score[b, 0].item() / generated**length_penalty
            done[b] = len(finished[b]) == k and finished[b][-1][0] >= best_running
        rows = (torch.arange(batch, device=ids.device)[:, None] * k + next_beam).flatten()  # (B·K,)
        ids = torch.cat([ids[rows], next_token.flatten()[:, None]], dim=1)
        mask = torch.cat([mask[rows], torch.ones_like(mask[:, :1])], dim=1)
        scores = next_score
        cache, new = _reorder_cache(cache, rows), 1
        if all(done):
            break
    for b in range(batch):
        if not done[b]:
            for beam in range(k):
                _add_hypothesis(finished[b], k, scores[b, beam].item() / (ids.shape[1] - prompt_len)**length_penalty,
                                ids[b * k + beam])
    best = [finished[b][0][1] for b in range(batch)]
    out = torch.full((batch, max(len(h) for h in best)), pad, dtype=torch.long, device=ids.device)
    for b, hyp in enumerate(best):
        out[b, :len(hyp)] = hyp
    return out


def _add_hypothesis(hyps: list[tuple[float, Tensor]], k: int, score: float, ids: Tensor) -> None:
    """Keep the ``k`` best (score, ids), best first."""
    hyps.append((score, ids))
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[k:]


def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, use_cache: bool = True, state: DecodeState | None = None) -> Tensor:
    """Hugging Face-style ``generate``: :func:`beam_search` when ``num_beams > 1``,
    else :func:`greedy_or_sample` (which alone takes a ``state`` kept across calls).
    Returns ``(B, T + n')`` token ids."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be ≥ 1, got {num_beams}")
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search with sampling is not supported: use num_beams=1 with do_sample=True, "
                             "or do_sample=False with beams")
        if state is not None:
            raise ValueError("a DecodeState (cache kept across calls) works with num_beams=1 only")
        return beam_search(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           use_cache=use_cache)
    return greedy_or_sample(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                  temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, seed=seed, use_cache=use_cache, state=state)
