"""Dilated attention (LongNet, Ding et al. 2023) as Prov-GigaPath runs it.

Notation: B batch, N tokens, H heads, d head dim, C = H·d. A *branch* is one pair
(w, r) of segment length and dilation ratio. On N tokens it uses the segment
length s = min(w, N) (a sequence shorter than w is one segment, still dilated),
S = ceil(N/s) segments, each padded to s_r = ceil(s/r)·r rows, and m = s_r/r rows
per head and segment. Head h keeps the segment rows j ≡ o_h (mod r) with
``o_h = h // ceil(H/r)``: block-wise, so with 16 heads and r = 2 heads 0-7 read the
even rows and heads 8-15 the odd ones. Each (segment, head) *group* of m rows
attends within itself.

The official algorithm (``torchscale/component/dilated_attention.py``), reproduced:

- padding rows (to a multiple of s, then of r) are zero vectors after the q/k/v
  projections and are *not* masked: every zero key adds exp(0) to its group's
  softmax denominator;
- a group's outputs go back to the flattened padded index ``seg·s_r + j`` and the
  result is cropped to N, so when S > 1 and s % r != 0 the rows of later segments
  land shifted by the padding (with the published lengths only the (185363, 8)
  branch, above 185,363 tokens);
- the branches are combined with weights softmax_i(lse_i) per (token, head),
  computed without gradient, where lse_i is the log-sum-exp of the branch's scores.
  The forward value is softmax attention over the multiset union of the branches'
  key sets (a key shared by two branches counts twice; zero pad keys included);
  :func:`dense_equivalent_mask` gives that union as counts. (The official code also
  takes a computed log-sum-exp of exactly 0.0 for "not computed"; that measure-zero
  case is not reproduced.)

Masks. ``mask`` (B, N) is True at real tokens. With a mask, padded tokens never
enter any softmax, and the official zero rows are accounted for *as if each
sequence had been run alone, unpadded*: for a sequence of n real tokens (the first n)
the number of zero rows the official layout would give each group is added to
its softmax as one zero key with weight log(count) (``count_pad_keys=True``, the
default), so a sequence padded to any length gives, on its real tokens, the
outputs of the official model on the unpadded sequence. ``count_pad_keys=False``
drops those zero rows as well, so padding of any kind never takes part in a
softmax: no longer the official model, but free of its padding artefact (a token
near the end of a short last segment no longer shares its attention with zeros).
Masked tokens keep their sequence positions; the exact equivalence needs the
padding at the end, as batching puts it (the slide encoder moves real tiles to the
front first). Without a mask the official behaviour holds, every row being real.

Cost. Per branch there are B·S·H groups of m × m scores, O(N·s/r²) work; the groups
go through the fused attention kernel ``chunk_size`` query rows × heads at a time
(whole segments, or one segment a few heads at a time), so memory is O(N·C)
whatever N, the working set of a chunk being bounded. Each branch needs the
log-sum-exp of its scores, which ``scaled_dot_product_attention`` does not return:
on CPU the kernel behind it (``aten._scaled_dot_product_flash_attention_for_cpu``)
returns it for free; elsewhere (CUDA) SDPA computes the output and the log-sum-exp
is recomputed without gradient, a chunk of queries at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DilatedAttention", "dilated_attention", "dense_equivalent_mask", "head_offsets"]

# The CPU flash kernel SDPA dispatches to; unlike SDPA it also returns the log-sum-exp.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_LSE_CHUNK = 1 << 24  # scores held at once when the log-sum-exp is recomputed


@dataclass(frozen=True)
class _Branch:
    r: int  # dilation ratio
    s: int  # segment length used on this sequence
    segments: int  # S
    s_r: int  # segment rows after padding to a multiple of r
    m: int  # rows per head and segment

    @classmethod
    def on(cls, segment_length: int, ratio: int, n: int) -> _Branch:
        s = min(segment_length, n)
        s_r = -(-s // ratio) * ratio
        return cls(r=ratio, s=s, segments=-(-n // s), s_r=s_r, m=s_r // ratio)


def head_offsets(num_heads: int, ratio: int, device: torch.device | None = None) -> Tensor:
    """(H,) the row offset each head keeps in a branch of dilation ``ratio``.

    Heads are padded to a multiple of the ratio and split into ``ratio`` contiguous
    blocks, block i keeping rows ≡ i (mod ratio) (the official ``dense_to_sparse``).
    """
    return torch.arange(num_heads, device=device) // -(-num_heads // ratio)


def _pad_key_counts(lengths: Tensor, segments: Tensor, offsets: Tensor, segment_length: int, ratio: int) -> Tensor:
    """(B, S', H) zero rows the official layout gives each group of sequences of
    ``lengths`` (B,) real tokens, for the segments ``segments`` (S',)."""
    n = lengths.view(-1, 1, 1)
    s = n.clamp(min=1, max=segment_length)  # the official s for that sequence alone
    rows = (s + ratio - 1) // ratio  # m for that sequence
    start = segments.view(1, -1, 1) * s
    first_pad = torch.minimum((n - start).clamp(min=0), s)  # segment rows from here on are zero
    count = rows - (first_pad - offsets.view(1, 1, -1) + ratio - 1) // ratio  # rows ≡ o in [first_pad, s_r)
    return torch.where(start < n, count, 0)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> tuple[Tensor, Tensor]:
    """Softmax attention per group: q (G, H, m, d), k/v (G, H, m', d), bias
    (G, H, 1, m') additive → out (G, H, m, d), lse (G, H, m) in at least float32."""
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, dropout_p, False, attn_mask=bias)
        return out, lse.to(lse_dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    with torch.no_grad():
        lse = torch.empty(q.shape[:-1], dtype=lse_dtype, device=q.device)
        step = max(1, _LSE_CHUNK // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        kt = k.transpose(-1, -2) * q.shape[-1] ** -0.5
        for i in range(0, q.shape[2], step):
            scores = (q[:, :, i:i + step] @ kt).to(lse_dtype)  # (G, H, step, m')
            if bias is not None:
                scores += bias.to(lse_dtype)
            lse[:, :, i:i + step] = torch.logsumexp(scores, dim=-1)
    return out, lse


def _chunks(branch: _Branch, batch: int, heads: int, budget: int):
    """(segments, heads) ranges covering a branch, about ``budget`` query rows·heads each:
    whole segments while they fit, else one segment a few heads at a time."""
    per_segment = batch * branch.m * heads
    if per_segment <= budget:
        step = budget // per_segment
        for first in range(0, branch.segments, step):
            yield range(first, min(first + step, branch.segments)), range(heads)
        return
    step = max(1, budget // (batch * branch.m))
    for segment in range(branch.segments):
        for first in range(0, heads, step):
            yield range(segment, segment + 1), range(first, min(first + step, heads))


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, *, segment_lengths: Sequence[int],
                      dilation_ratios: Sequence[int], mask: Tensor | None = None, count_pad_keys: bool = True,
                      dropout_p: float = 0.0, chunk_size: int = 1 << 17) -> Tensor:
    """LongNet dilated attention on projected heads.

    Parameters
    ----------
    q, k, v : Tensor
        (B, N, H, d).
    segment_lengths, dilation_ratios : sequence of int
        One branch per pair.
    mask : Tensor, optional
        (B, N) bool, True at real tokens (see the module notes).
    count_pad_keys : bool
        With a mask, whether the official zero pad rows take part in the softmax.
    dropout_p : float
        Dropout on the attention probabilities.
    chunk_size : int
        Query rows × heads gathered and attended per fused call (the working memory
        is a few times ``chunk_size · d`` elements, whatever N).

    Returns
    -------
    Tensor
        (B, N, H, d), the branches combined; finite but meaningless at masked tokens.
    """
    if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
        raise ValueError("need one dilation ratio per segment length, and at least one branch")
    B, N, H, d = q.shape
    device = q.device
    lengths = None
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        lengths = mask.sum(1)  # (B,)
    # Row N of the accumulators takes the rows the official crop drops.
    acc = q.new_zeros(B, N + 1, H, d)
    acc_lse = torch.full((B, N + 1, H), -math.inf, dtype=torch.promote_types(q.dtype, torch.float32), device=device)
    b_index = torch.arange(B, device=device).view(B, 1, 1, 1)

    for segment_length, ratio in zip(segment_lengths, dilation_ratios):
        branch = _Branch.on(int(segment_length), int(ratio), N)
        all_offsets = head_offsets(H, branch.r, device)  # (H,)
        for segment_range, head_range in _chunks(branch, B, H, chunk_size):
            segments = torch.arange(segment_range.start, segment_range.stop, device=device)  # (S',)
            heads = torch.arange(head_range.start, head_range.stop, device=device)  # (H',)
            offsets = all_offsets[heads]
            h_index = heads.view(1, 1, -1, 1)
            local = offsets[:, None] + branch.r * torch.arange(branch.m, device=device)  # (H', m) row in segment
            rows = segments.view(-1, 1, 1) * branch.s + local  # (S', H', m) token read
            real = (local < branch.s) & (rows < N)  # (S', H', m); False: an official zero row
            rows = rows.clamp(max=N - 1)
            if mask is not None:
                real = real & mask[b_index, rows]  # (B, S', H', m)
            shape = (B * len(segments), len(heads), branch.m, d)  # (G, H', m, d)

            def gather(x: Tensor) -> Tensor:  # (B, N, H, d) → (G, H', m, d), zero where not real
                return x[b_index, rows, h_index].masked_fill_(~real.unsqueeze(-1), 0.0).reshape(shape)

            qi, ki, vi = gather(q), gather(k), gather(v)
            bias = empty = None
            if mask is not None:
                # One extra zero key per group stands for the official zero rows: weight log(count).
                if count_pad_keys:
                    counts = _pad_key_counts(lengths, segments, offsets, int(segment_length), branch.r)
                else:
                    counts = torch.zeros(B, len(segments), len(heads), dtype=torch.long, device=device)
                real = real.expand(B, -1, -1, -1)
                empty = ~real.any(-1) & (counts == 0)  # (B, S', H') nothing to attend to
                extra = counts.to(acc_lse.dtype).log().masked_fill(empty, 0.0)  # empty: a dummy key, dropped below
                bias = torch.cat([torch.zeros_like(real, dtype=acc_lse.dtype).masked_fill(~real, -math.inf),
                                  extra.unsqueeze(-1)], dim=-1)
                bias = bias.to(q.dtype).reshape(shape[0], shape[1], 1, branch.m + 1)
                ki = F.pad(ki, (0, 0, 0, 1))
                vi = F.pad(vi, (0, 0, 0, 1))
            out, lse = _attend(qi, ki, vi, bias, dropout_p)
            del qi, ki, vi
            out = out.reshape(B, len(segments), len(heads), branch.m, d)
            lse = lse.detach().reshape(B, len(segments), len(heads), branch.m)
            if empty is not None:
                lse = lse.masked_fill(empty.unsqueeze(-1), -math.inf)

            # Official scatter: flattened padded index, cropped to N (row N is the bin).
            out_rows = segments.view(-1, 1, 1) * branch.s_r + local
            out_rows = out_rows.masked_fill(out_rows >= N, N)
            index = (b_index, out_rows, h_index)
            old = acc_lse[index]  # (B, S', H', m)
            new = torch.logaddexp(old, lse)
            safe = new.masked_fill(new == -math.inf, 0.0)
            keep_old = (old - safe).exp().to(acc.dtype).unsqueeze(-1)
            take_new = (lse - safe).exp().to(acc.dtype).unsqueeze(-1)
            mixed = acc[index]
            if mixed.requires_grad or out.requires_grad:
                mixed = torch.addcmul(mixed * keep_old, out, take_new)
            else:  # inference: no copies
                mixed.mul_(keep_old).addcmul_(out, take_new)
            acc[index] = mixed
            acc_lse[index] = new
    return acc[:, :N]


def dense_equivalent_mask(n: int, segment_lengths: Sequence[int], dilation_ratios: Sequence[int],
                          num_heads: int) -> tuple[Tensor, Tensor]:
    """The dense attention that equals dilated attention on ``n`` unmasked tokens.

    Returns
    -------
    counts : Tensor
        (H, n, n) int64: in how many branches query i and key j share a group for head h.
    pad_counts : Tensor
        (H, n) int64: how many official zero rows are among query i's keys, summed
        over branches.

    Softmax attention with scores ``q·k/√d + log(counts)`` plus one zero key (score 0,
    value 0) of weight ``log(pad_counts)`` equals :func:`dilated_attention` without a
    mask; without that extra key it equals the masked form with
    ``count_pad_keys=False``. Not defined when the official crop shifts rows
    (a branch with S > 1 and s % r != 0): then a token's output is another row's.
    """
    counts = torch.zeros(num_heads, n, n, dtype=torch.long)
    pad_counts = torch.zeros(num_heads, n, dtype=torch.long)
    position = torch.arange(n)
    for segment_length, ratio in zip(segment_lengths, dilation_ratios):
        branch = _Branch.on(int(segment_length), int(ratio), n)
        if branch.segments > 1 and branch.s % branch.r:
            raise ValueError(f"branch ({segment_length}, {ratio}) on {n} tokens shifts rows; no dense equivalent")
        offsets = head_offsets(num_heads, branch.r)
        segment, row = position // branch.s, position % branch.s
        covered = (row % branch.r).unsqueeze(0) == offsets.unsqueeze(1)  # (H, n)
        group = torch.where(covered, segment.unsqueeze(0), -1)  # (H, n) segment of the group or -1
        counts += ((group.unsqueeze(2) == group.unsqueeze(1)) & covered.unsqueeze(2)).long()
        pads = _pad_key_counts(torch.tensor([n]), torch.arange(branch.segments), offsets, branch.s, branch.r)[0]
        pad_counts += torch.where(covered, pads[segment].T, 0)
    return counts, pad_counts


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention with Prov-GigaPath's parameter names.

    ``x (B, N, C) → q/k/v_proj → dilated attention → inner_attn_ln (subln) → out_proj``.

    Parameters
    ----------
    dim : int
        C.
    num_heads : int
        H; d = C / H and the scores are scaled by 1/√d.
    segment_lengths, dilation_ratios : sequence of int
        The branches (w_i, r_i).
    dropout : float
        Dropout on the attention probabilities (Prov-GigaPath: 0).
    subln : bool
        LayerNorm on the merged heads before ``out_proj`` (``inner_attn_ln``).
    layernorm_eps : float
        Its epsilon.
    count_pad_keys : bool
        With a mask, count the official zero pad rows in the softmax (see the module notes).
    chunk_size : int
        Query rows × heads attended per fused call; bounds the working memory.
    """

    def __init__(self, *, dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_ratios: Sequence[int],
                 dropout: float = 0.0, subln: bool = True, layernorm_eps: float = 1e-5, count_pad_keys: bool = True,
                 chunk_size: int = 1 << 17):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if len(segment_lengths) != len(dilation_ratios):
            raise ValueError("need one dilation ratio per segment length")
        self.num_heads = num_heads
        self.segment_lengths = tuple(int(s) for s in segment_lengths)
        self.dilation_ratios = tuple(int(r) for r in dilation_ratios)
        self.dropout = dropout
        self.count_pad_keys = count_pad_keys
        self.chunk_size = chunk_size
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=layernorm_eps) if subln else None

    def forward(self, x: Tensor, mask: Tensor | None = None, pre_norm: nn.Module | None = None) -> Tensor:
        """x (B, N, C), mask (B, N) True at real tokens → (B, N, C).

        ``pre_norm`` (a pre-LN layer's norm) is applied to x first; applied here rather
        than by the caller, its (B, N, C) output is freed as soon as q, k, v exist.
        """
        B, N, C = x.shape
        if pre_norm is not None:
            x = pre_norm(x)
        heads = (B, N, self.num_heads, C // self.num_heads)
        q, k, v = (proj(x).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, N, H, d)
        del x
        out = dilated_attention(q, k, v, segment_lengths=self.segment_lengths, dilation_ratios=self.dilation_ratios,
                                mask=mask, count_pad_keys=self.count_pad_keys,
                                dropout_p=self.dropout if self.training else 0.0, chunk_size=self.chunk_size)
        del q, k, v  # long sequences: free 3·N·C before the output projections
        out = out.reshape(B, N, C)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)
