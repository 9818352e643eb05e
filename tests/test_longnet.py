"""Dilated attention and the Prov-GigaPath slide encoder: the official algorithm
re-implemented with loops, dense attention with the equivalent mask, padding
invariance, gradients, the checkpoint key layout and the sin-cos positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import histoscope.layers.dilated_attention as dilated
from histoscope.layers.dilated_attention import DilatedAttention, dense_equivalent_mask, dilated_attention, head_offsets
from histoscope.layers.sincos import sincos_2d
from histoscope.slide import load_slide_model
from histoscope.slide.models.longnet import (
    LongNetSlideEncoder,
    gigapath_state_dict,
    grid_indices,
    optimal_segment_lengths,
)

# (N, H, segment lengths, ratios): N a multiple of the segment or not, N < segment,
# heads not a multiple of the ratio, ratio > heads, and two layouts with shifted rows.
CASES = [
    (37, 4, [8, 16], [1, 2]),
    (5, 4, [8, 16], [1, 2]),
    (64, 6, [4, 16, 32], [1, 2, 4]),
    (100, 16, [16, 40, 64], [1, 4, 16]),
    (3, 16, [1024, 5792], [1, 2]),
    (20, 2, [6, 8], [1, 4]),  # r > H: rows ≡ 2, 3 (mod 4) unread by that branch
    (12, 2, [5], [2]),  # s % r != 0 with S > 1: official rows shift
    (33, 4, [7, 11], [1, 3]),  # same, two branches
]
SHIFTED = {(12, (5,)), (33, (7, 11))}


def official_reference(q, k, v, segment_lengths, ratios, detach_lse=True):
    """Prov-GigaPath's gathering / flash / scattering, spelled out with loops (spec §1.3).

    q, k, v (B, N, H, d). Zero rows pad each segment to s, then to a multiple of r;
    head h reads rows ≡ h // ceil(H/r) (mod r); outputs land at the flattened padded
    index seg·s_r + j, cropped to N; uncovered rows get lse -1e8; the branches are
    mixed with softmax(lse) computed without gradient.
    """
    B, N, H, d = q.shape
    outs, lses = [], []
    for w, r in zip(segment_lengths, ratios):
        s = min(w, N)
        segments, s_r, block = -(-N // s), -(-s // r) * r, -(-H // r)
        out = torch.zeros(B, segments * s_r, H, d, dtype=q.dtype)
        lse = torch.full((B, segments * s_r, H), -1e8, dtype=q.dtype)
        for seg in range(segments):
            padded = []
            for x in (q, k, v):
                rows = torch.zeros(B, s_r, H, d, dtype=q.dtype)
                for j in range(s):
                    if seg * s + j < N:
                        rows[:, j] = x[:, seg * s + j]
                padded.append(rows)
            for h in range(H):
                keep = list(range(h // block, s_r, r))
                qh, kh, vh = (x[:, keep, h] for x in padded)  # (B, m, d)
                scores = qh @ kh.transpose(1, 2) / math.sqrt(d)
                at = [seg * s_r + j for j in keep]
                out[:, at, h] = torch.softmax(scores, -1) @ vh
                lse[:, at, h] = torch.logsumexp(scores, -1).detach() if detach_lse else torch.logsumexp(scores, -1)
        outs.append(out[:, :N])
        lses.append(lse[:, :N])
    weights = torch.softmax(torch.stack(lses), dim=0)
    return (weights.unsqueeze(-1) * torch.stack(outs)).sum(0)


def dense_reference(q, k, v, counts, pad_counts=None):
    """Softmax over the multiset of keys: score + log(count), plus one zero key of weight pad_counts."""
    B, N, H, d = q.shape
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d) + counts.to(q.dtype).log()
    values = v
    if pad_counts is not None:
        scores = torch.cat([scores, pad_counts.to(q.dtype).log()[None, :, :, None].expand(B, -1, -1, 1)], dim=-1)
        values = torch.cat([v, v.new_zeros(B, 1, H, d)], dim=1)
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), values)


def _qkv(n, h, batch=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, h, d, generator=gen, dtype=torch.float64) * 2 for _ in range(3)]


@pytest.fixture(params=["cpu-kernel", "sdpa+lse"])
def attention_path(request, monkeypatch):
    """Run with the CPU flash kernel (lse returned) and with the portable SDPA path (lse recomputed)."""
    if request.param == "sdpa+lse":
        monkeypatch.setattr(dilated, "_CPU_FLASH", None)
    return request.param


# ------------------------------------------------------------------------ dilated attention

def test_head_offsets_are_blockwise():
    assert head_offsets(16, 2).tolist() == [0] * 8 + [1] * 8
    assert head_offsets(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert head_offsets(16, 16).tolist() == list(range(16))
    assert head_offsets(6, 4).tolist() == [0, 0, 1, 1, 2, 2]  # heads padded to 8, blocks of 2
    assert head_offsets(4, 16).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("n", "h", "lengths", "ratios"), CASES)
def test_matches_official_reference(n, h, lengths, ratios, attention_path):
    q, k, v = _qkv(n, h)
    expected = official_reference(q, k, v, lengths, ratios)
    got = dilated_attention(q, k, v, segment_lengths=lengths, dilation_ratios=ratios, chunk_size=16)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    # float32, as models run: the same within float32 rounding
    got32 = dilated_attention(*(x.float() for x in (q, k, v)), segment_lengths=lengths, dilation_ratios=ratios)
    assert (got32.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("n", "h", "lengths", "ratios"), [c for c in CASES if (c[0], tuple(c[2])) not in SHIFTED])
def test_equals_dense_attention_with_equivalent_mask(n, h, lengths, ratios):
    q, k, v = _qkv(n, h, seed=1)
    counts, pad_counts = dense_equivalent_mask(n, lengths, ratios, h)
    assert counts.diagonal(dim1=1, dim2=2).min() >= 1  # every token sees itself (the r = 1 branch)
    got = dilated_attention(q, k, v, segment_lengths=lengths, dilation_ratios=ratios)
    torch.testing.assert_close(got, dense_reference(q, k, v, counts, pad_counts), atol=1e-10, rtol=0)
    # the masked form without pad keys is the dense attention without the zero key
    excluded = dilated_attention(q, k, v, segment_lengths=lengths, dilation_ratios=ratios,
                                 mask=torch.ones(2, n, dtype=torch.bool), count_pad_keys=False)
    torch.testing.assert_close(excluded, dense_reference(q, k, v, counts), atol=1e-10, rtol=0)


def test_dense_equivalent_mask_known_answer():
    """N=6, one head, branches (4, 1) and (6, 2): segments [0-3], [4-5] (padded to 8), and
    the even rows of the whole sequence."""
    counts, pad_counts = dense_equivalent_mask(6, [4, 6], [1, 2], 1)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[:4, :4] += 1
    expected[4:, 4:] += 1
    for i in (0, 2, 4):
        expected[i, [0, 2, 4]] += 1
    assert torch.equal(counts[0], expected)
    assert pad_counts[0].tolist() == [0, 0, 0, 0, 2, 2]  # the second segment's two zero rows
    with pytest.raises(ValueError, match="shifts rows"):
        dense_equivalent_mask(12, [5], [2], 2)


@pytest.mark.parametrize(("n", "h", "lengths", "ratios"), CASES)
@pytest.mark.parametrize("count_pad_keys", [True, False])
def test_padding_changes_nothing(n, h, lengths, ratios, count_pad_keys, attention_path):
    """A batch of a slide padded with 13 garbage tokens and a shorter slide gives, on the
    real tokens, what each slide gives alone (with count_pad_keys: unmasked, official)."""
    q, k, v = _qkv(n, h, seed=2)
    garbage = _qkv(13, h, seed=3)
    qp, kp, vp = (torch.cat([x, g * 5], dim=1) for x, g in zip((q, k, v), garbage))
    mask = torch.zeros(2, n + 13, dtype=torch.bool)
    mask[0, :n] = True
    mask[1, :max(n - 2, 1)] = True
    padded = dilated_attention(qp, kp, vp, segment_lengths=lengths, dilation_ratios=ratios, mask=mask,
                               count_pad_keys=count_pad_keys, chunk_size=8)
    for b in range(2):
        m = int(mask[b].sum())
        alone_mask = None if count_pad_keys else torch.ones(1, m, dtype=torch.bool)
        alone = dilated_attention(*(x[b:b + 1, :m] for x in (q, k, v)), segment_lengths=lengths,
                                  dilation_ratios=ratios, mask=alone_mask, count_pad_keys=count_pad_keys)
        assert (padded[b:b + 1, :m] - alone).abs().max() <= 1e-10
    # float32
    padded32 = dilated_attention(*(x.float() for x in (qp, kp, vp)), segment_lengths=lengths, dilation_ratios=ratios,
                                 mask=mask, count_pad_keys=count_pad_keys)
    assert (padded32[:, :n - 2].double() - padded[:, :n - 2]).abs().max() <= 1e-5


def test_gradients_match_reference():
    """Gradients equal the official ones (no gradient through the branch weights)."""
    q, k, v = (x.requires_grad_() for x in _qkv(33, 4, seed=4))
    lengths, ratios = [7, 11, 40], [1, 3, 2]
    upstream = torch.randn(2, 33, 4, 8, dtype=torch.float64)
    expected = torch.autograd.grad((official_reference(q, k, v, lengths, ratios) * upstream).sum(), (q, k, v))
    for mask in (None, torch.ones(2, 33, dtype=torch.bool)):
        out = dilated_attention(q, k, v, segment_lengths=lengths, dilation_ratios=ratios, mask=mask, chunk_size=8)
        got = torch.autograd.grad((out * upstream).sum(), (q, k, v))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=0)


def test_layer_parameter_names_and_chunking():
    layer = DilatedAttention(dim=32, num_heads=4, segment_lengths=[8, 16], dilation_ratios=[1, 2]).double().eval()
    assert [k for k in layer.state_dict()] == [f"{p}.{t}" for p in ("k_proj", "v_proj", "q_proj", "out_proj",
                                                                    "inner_attn_ln") for t in ("weight", "bias")]
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    whole = layer(x)
    layer.chunk_size = 1  # one segment and one head at a time
    torch.testing.assert_close(layer(x), whole, atol=1e-12, rtol=0)
    heads = lambda proj: proj(x).view(2, 50, 4, 8)  # noqa: E731
    attn = official_reference(heads(layer.q_proj), heads(layer.k_proj), heads(layer.v_proj), [8, 16], [1, 2])
    torch.testing.assert_close(whole, layer.out_proj(layer.inner_attn_ln(attn.reshape(2, 50, 32))),
                               atol=1e-10, rtol=0)


# ------------------------------------------------------------------------- positions

def test_grid_position_known_values():
    """coords (512, 256), tile 256 → gx = 2, gy = 1; PE = [sin(gy ω), cos(gy ω), sin(gx ω), cos(gx ω)]."""
    model = load_slide_model("gigapath_slide", in_dim=8, embed_dim=768, depth=0)
    pe = model.position_embedding(torch.tensor([[[512.0, 256.0]]]), torch.float64)[0, 0]
    for t in (0, 1, 57, 191):
        omega = 10000 ** (-t / 192)
        assert pe[t].item() == pytest.approx(math.sin(1 * omega), abs=1e-12)
        assert pe[192 + t].item() == pytest.approx(math.cos(1 * omega), abs=1e-12)
        assert pe[384 + t].item() == pytest.approx(math.sin(2 * omega), abs=1e-12)
        assert pe[576 + t].item() == pytest.approx(math.cos(2 * omega), abs=1e-12)
    # 0.5 µm/px tiles from a 0.25 µm/px scan: level-0 coords step by 512, so tile_size = 512
    model.tile_size = 512
    pe512 = model.position_embedding(torch.tensor([[[1024.0, 512.0]]]), torch.float64)[0, 0]
    torch.testing.assert_close(pe512, pe)


def _mae_table(dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(dim, grid_size, cls_token=True), written out."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


def test_positions_match_the_official_table_including_wrap():
    """Row ``floor(x/t)·ngrids + floor(y/t) + 1`` of the official table, also when gy ≥ ngrids."""
    ngrids, tile = 7, 256
    table = torch.from_numpy(_mae_table(16, ngrids))
    model = load_slide_model("gigapath_slide", in_dim=8, embed_dim=16, depth=0, slide_ngrids=ngrids, tile_size=tile)
    gen = torch.Generator().manual_seed(0)
    coords = torch.randint(0, ngrids * tile, (1, 40, 2), generator=gen).double()
    coords[0, :3] = torch.tensor([[0.0, 0.0], [6 * tile + 255, 8 * tile], [2 * tile, 9 * tile + 3]])  # gy ≥ 7 wraps
    pos = (torch.floor(coords / tile)[..., 0] * ngrids + torch.floor(coords / tile)[..., 1]).long() + 1
    ours = model.position_embedding(coords, torch.float64)
    inside = pos <= ngrids * ngrids  # rows that exist in the official (ngrids² + 1)-row table
    assert inside.sum() >= 37 and not inside[0, 1]  # the (6, 8) cell lies past the table's end
    torch.testing.assert_close(ours[inside], table[pos[inside]], atol=1e-12, rtol=0)
    # Past the end the official lookup would fail; we continue its formula: flat grid
    # index k = pos - 1 encodes (k mod ngrids) in the first half and (k div ngrids) in the second.
    k = int(pos[0, 1]) - 1
    big = _mae_table(16, 64)  # a table large enough to hold both indices: row 1 + j encodes (j mod 64, j div 64)
    expected = np.concatenate([big[1 + k % ngrids][:8], big[1 + 64 * (k // ngrids)][8:]])
    torch.testing.assert_close(ours[0, 1], torch.from_numpy(expected), atol=1e-12, rtol=0)
    gx, gy = grid_indices(torch.tensor([2.0 * tile, 9 * tile + 3]), tile, ngrids)
    assert (int(gx), int(gy)) == (3, 2)
    # sincos_2d(col, row): [sin(col ω), cos(col ω), sin(row ω), cos(row ω)], ω_t = 10000^(-t/(dim/4))
    pe = sincos_2d(torch.tensor([1]), torch.tensor([2]), 8, torch.float64)[0]
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    reference = np.concatenate([np.sin(1 * omega), np.cos(1 * omega), np.sin(2 * omega), np.cos(2 * omega)])
    torch.testing.assert_close(pe, torch.from_numpy(reference), atol=1e-12, rtol=0)


def test_published_segment_lengths():
    assert optimal_segment_lengths(262144, 256) == [1024, 5792, 32768, 185363, 1048576]


# ------------------------------------------------------------------------ the encoder

def _official_layout() -> dict[str, tuple[int, ...]]:
    """Prov-GigaPath slide_encoder.pth key layout (spec §1.5)."""
    keys = {"cls_token": (1, 1, 768), "patch_embed.proj.weight": (768, 1536), "patch_embed.proj.bias": (768,)}
    for i in range(12):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys |= {f"{p}self_attn.{proj}.weight": (768, 768), f"{p}self_attn.{proj}.bias": (768,)}
        keys |= {f"{p}self_attn.inner_attn_ln.weight": (768,), f"{p}self_attn.inner_attn_ln.bias": (768,),
                 f"{p}self_attn_layer_norm.weight": (768,), f"{p}self_attn_layer_norm.bias": (768,),
                 f"{p}ffn.fc1.weight": (3072, 768), f"{p}ffn.fc1.bias": (3072,),
                 f"{p}ffn.fc2.weight": (768, 3072), f"{p}ffn.fc2.bias": (768,),
                 f"{p}ffn.ffn_layernorm.weight": (3072,), f"{p}ffn.ffn_layernorm.bias": (3072,),
                 f"{p}final_layer_norm.weight": (768,), f"{p}final_layer_norm.bias": (768,)}
    keys |= {"encoder.layer_norm.weight": (768,), "encoder.layer_norm.bias": (768,),
             "norm.weight": (768,), "norm.bias": (768,)}
    return keys


def test_full_size_key_layout_loads_strictly_on_meta():
    layout = _official_layout()
    assert len(layout) == 247
    with torch.device("meta"):
        model = load_slide_model("gigapath_slide", in_dim=1536)
        official = {"model": {k: torch.empty(shape) for k, shape in layout.items()}}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert sum(p.numel() for p in model.parameters()) == 86_330_880
    model.load_state_dict(gigapath_state_dict(official), strict=True, assign=True)
    layer = model.encoder.layers[3]
    assert layer.self_attn.segment_lengths == (1024, 5792, 32768, 185363, 1048576)
    assert layer.self_attn.dilation_ratios == (1, 2, 4, 8, 16)
    assert layer.self_attn_layer_norm.eps == 1e-5 and model.norm.eps == 1e-6
    assert [round(m.drop_prob, 5) for m in (model.encoder.layers[1].drop_path, model.encoder.layers[11].drop_path)] \
        == [0.00909, 0.1]


def _reference_encoder(model: LongNetSlideEncoder, features, coords, lengths, ratios):
    """The official LongNetViT forward, written from the spec with the loop attention."""
    e = model.width
    gx, gy = torch.floor(coords[..., 0] / model.tile_size), torch.floor(coords[..., 1] / model.tile_size)
    omega = 1.0 / 10000 ** (torch.arange(e // 4, dtype=torch.float64) / (e / 4))
    pe = torch.cat([torch.sin(gy[..., None] * omega), torch.cos(gy[..., None] * omega),
                    torch.sin(gx[..., None] * omega), torch.cos(gx[..., None] * omega)], dim=-1)
    x = model.patch_embed.proj(features) + pe
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1)
    states = [x]
    for layer in model.encoder.layers:
        a = layer.self_attn
        y = layer.self_attn_layer_norm(x)
        heads = lambda proj: proj(y).view(*y.shape[:2], a.num_heads, -1)  # noqa: E731
        att = official_reference(heads(a.q_proj), heads(a.k_proj), heads(a.v_proj), lengths, ratios)
        x = x + a.out_proj(a.inner_attn_ln(att.flatten(2)))
        f = layer.ffn
        x = x + f.fc2(f.ffn_layernorm(F.gelu(f.fc1(layer.final_layer_norm(x)))))
        states.append(x)
    pool = lambda h: model.norm(h[:, 1:].mean(1))  # noqa: E731
    return pool(model.encoder.layer_norm(x)), [pool(h) for h in states]


def _slide(n: int, seed: int = 0, in_dim: int = 12):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(1, n, in_dim, generator=gen, dtype=torch.float64)
    coords = torch.randint(0, 60, (1, n, 2), generator=gen).double() * 256 + 17  # not on multiples of 256
    return features, coords


def test_encoder_matches_reference_forward():
    lengths, ratios = [8, 16], [1, 2]
    model = load_slide_model("gigapath_slide", in_dim=12, tiny=True, all_layer_embed=True).double().eval()
    features, coords = _slide(29)
    expected, states = _reference_encoder(model, features, coords, lengths, ratios)
    with torch.no_grad():
        out = model(features, coords)
    torch.testing.assert_close(out.embedding, expected.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.extras["layer_embeddings"], torch.stack(states, 1).detach(), atol=1e-10, rtol=0)
    # TRIDENT / ClassificationHead style: the pooled output of layer 1 (here the last but one)
    hooked = load_slide_model("gigapath_slide", in_dim=12, tiny=True, feat_layers=[1]).double().eval()
    hooked.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hooked(features, coords).embedding, states[1].detach(), atol=1e-10, rtol=0)


def test_masked_tiles_anywhere_are_dropped():
    """Masked tiles in the middle of the sequence act as if removed; scores are 0 there."""
    model = load_slide_model("gigapath_slide", in_dim=12, tiny=True).double().eval()
    features, coords = _slide(30, seed=1)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, [0, 7, 8, 21]] = False
    with torch.no_grad():
        holes = model(features, coords, mask)
        kept = model(features[:, mask[0]], coords[:, mask[0]])
    torch.testing.assert_close(holes.embedding, kept.embedding, atol=1e-10, rtol=0)
    torch.testing.assert_close(holes.scores[:, mask[0]], kept.scores, atol=1e-10, rtol=0)
    assert (holes.scores[~mask] == 0).all()


def test_checkpoint_in_official_file_layout_loads(tmp_path):
    torch.manual_seed(0)
    source = load_slide_model("gigapath_slide", in_dim=12, tiny=True).eval()
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = load_slide_model("gigapath_slide", in_dim=12, tiny=True, weights=path).eval()
    features, coords = _slide(21)
    with torch.no_grad():
        features = features.float()
        torch.testing.assert_close(loaded(features, coords).embedding, source(features, coords).embedding)
