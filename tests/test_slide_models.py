"""Slide models: the interface contract for every registered model, then per-family
known-answer and parity tests (CLAM layout and instance loss, Nyström attention,
TransMIL padding, Perceiver resampler against a plain re-implementation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from histoscope.layers.nystrom import NystromAttention
from histoscope.slide import list_slide_models, load_slide_model
from histoscope.slide.models.transmil import square_pad

IN_DIM = 32
NUM_OUTPUTS = 3
TILE = 256  # level-0 px per tile


def _grid(cols: int, rows: int, origin: tuple[int, int]) -> torch.Tensor:
    """(cols·rows, 2) level-0 (x, y) of a raster of tiles, row-major."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1) * TILE + torch.tensor(origin)


def _batch(seed: int = 0):
    """Three slides of 20, 12 and 3 tiles, padded to 20 with garbage features and coords."""
    gen = torch.Generator().manual_seed(seed)
    slides = [_grid(5, 4, (40 * TILE, 30 * TILE)), _grid(3, 4, (8 * TILE, 64 * TILE)), _grid(3, 1, (0, 0))]
    n_max = max(len(c) for c in slides)
    features = torch.randn(len(slides), n_max, IN_DIM, generator=gen)
    coords = torch.randint(0, 200, (len(slides), n_max, 2), generator=gen) * TILE  # garbage, but plausible
    mask = torch.zeros(len(slides), n_max, dtype=torch.bool)
    for b, c in enumerate(slides):
        coords[b, :len(c)] = c
        mask[b, :len(c)] = True
    features[~mask] = features[~mask] * 10 + 5
    return features, coords, mask


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("name", list_slide_models())
def test_slide_model_contract(name):
    """Shapes, gradients for every parameter, padding invariance, no NaN, bf16 ≈ fp32."""
    torch.manual_seed(0)
    model = load_slide_model(name, in_dim=IN_DIM, num_outputs=NUM_OUTPUTS, tiny=True)
    features, coords, mask = _batch()
    batch, n_max = mask.shape
    targets = torch.arange(batch) % NUM_OUTPUTS  # every class present (CLAM: every instance classifier used)

    # forward shapes and backward (train mode: dropout on, seeded)
    model.train()
    out = model(features, coords, mask)
    assert out.embedding.shape == (batch, model.embed_dim)
    assert out.logits.shape == (batch, NUM_OUTPUTS) and model.num_outputs == NUM_OUTPUTS
    assert out.scores.shape == (batch, n_max)
    loss = F.cross_entropy(out.logits.float(), targets)
    aux = model.auxiliary_loss(out, targets)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    bad_grad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert not bad_grad, f"parameters with non-finite gradient: {bad_grad}"

    # padding changes nothing; no NaN anywhere
    model.eval()
    with torch.no_grad():
        out = model(features, coords, mask)
        for t in (out.embedding, out.logits, out.scores):
            assert torch.isfinite(t).all()
        assert (out.scores[~mask] == 0).all()
        for b in range(batch):
            n = int(mask[b].sum())
            alone = model(features[b:b + 1, :n], coords[b:b + 1, :n])
            torch.testing.assert_close(out.logits[b:b + 1], alone.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.embedding[b:b + 1], alone.embedding, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.scores[b:b + 1, :n], alone.scores, atol=1e-5, rtol=1e-5)

        # bf16 agrees with fp32 (coords stay as they are: positions, not activations)
        half = copy.deepcopy(model).to(torch.bfloat16)
        out16 = half(features.to(torch.bfloat16), coords, mask)
        assert out16.logits.dtype == torch.bfloat16
        assert torch.isfinite(out16.logits.float()).all()
        assert _cosine(out16.logits, out.logits) > 0.99
        assert _cosine(out16.embedding, out.embedding) > 0.99


# --------------------------------------------------------------------------- ABMIL

def test_abmil_attention_is_a_masked_softmax_known_answer():
    """Trunk = identity, attention logit = tanh(x₀): weights are softmax(tanh(x₀)) by hand."""
    model = load_slide_model("abmil", in_dim=2, num_outputs=1, hidden_dim=2, attn_dim=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.attention_net[0].weight.copy_(torch.eye(2))
        model.attention_net[3].module[0].weight.fill_(0).data[0, 0] = 1.0  # tanh(h₀)
        model.attention_net[3].module[3].weight.fill_(1.0)
        model.classifiers.weight.copy_(torch.tensor([[1.0, 2.0]]))
    tiles = [(0.0, 1.0), (0.5, 0.0), (1.0, 3.0)]
    features = torch.tensor([tiles + [(9.0, -9.0)]])  # last tile is padding
    mask = torch.tensor([[True, True, True, False]])
    out = model(features, None, mask)

    exps = [math.exp(math.tanh(x0)) for x0, _ in tiles]
    weights = [e / sum(exps) for e in exps]
    embedding = [sum(w * max(t[j], 0.0) for w, t in zip(weights, tiles)) for j in range(2)]
    torch.testing.assert_close(out.scores, torch.tensor([weights + [0.0]]))
    torch.testing.assert_close(out.embedding, torch.tensor([embedding]))
    torch.testing.assert_close(out.logits, torch.tensor([[embedding[0] + 2 * embedding[1]]]))


def test_gated_attention_matches_formula():
    torch.manual_seed(0)
    model = load_slide_model("abmil_gated", in_dim=6, num_outputs=2, hidden_dim=5, attn_dim=4).eval()
    x = torch.randn(1, 7, 6)
    out = model(x)
    net = model.attention_net
    h = torch.relu(net[0](x[0]))
    a = torch.tanh(h @ net[3].attention_a[0].weight.T + net[3].attention_a[0].bias)
    g = torch.sigmoid(h @ net[3].attention_b[0].weight.T + net[3].attention_b[0].bias)
    logits = (a * g) @ net[3].attention_c.weight.T + net[3].attention_c.bias  # (N, 1)
    torch.testing.assert_close(out.scores[0], torch.softmax(logits[:, 0], 0))
    torch.testing.assert_close(out.embedding[0], out.scores[0] @ h)


# ---------------------------------------------------------------------------- CLAM

def _clam_layout(n: int, mb: bool) -> dict[str, tuple[int, ...]]:
    """CLAM's state_dict at size "small", gated, dropout > 0 (spec §3.4)."""
    keys = {
        "attention_net.0.weight": (512, 1024), "attention_net.0.bias": (512,),
        "attention_net.3.attention_a.0.weight": (256, 512), "attention_net.3.attention_a.0.bias": (256,),
        "attention_net.3.attention_b.0.weight": (256, 512), "attention_net.3.attention_b.0.bias": (256,),
        "attention_net.3.attention_c.weight": (n if mb else 1, 256), "attention_net.3.attention_c.bias": (n if mb else 1,),
    }
    if mb:
        for c in range(n):
            keys |= {f"classifiers.{c}.weight": (1, 512), f"classifiers.{c}.bias": (1,)}
    else:
        keys |= {"classifiers.weight": (n, 512), "classifiers.bias": (n,)}
    for c in range(n):
        keys |= {f"instance_classifiers.{c}.weight": (2, 512), f"instance_classifiers.{c}.bias": (2,)}
    return keys


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "n", "mb"), [("clam_sb", 2, False), ("clam_mb", 3, True)])
def test_clam_key_layout_matches_published(name, n, mb):
    assert _shapes(load_slide_model(name, in_dim=1024, num_outputs=n)) == _clam_layout(n, mb)
    big = _shapes(load_slide_model(name, in_dim=1024, num_outputs=n, size="big"))
    assert big["attention_net.3.attention_a.0.weight"] == (384, 512)


def test_abmil_key_layout():
    gated = _shapes(load_slide_model("abmil_gated", in_dim=1024, num_outputs=2))
    assert gated == {k: v for k, v in _clam_layout(2, False).items() if not k.startswith("instance_")}
    plain = _shapes(load_slide_model("abmil", in_dim=1024, num_outputs=2))
    assert plain["attention_net.3.module.0.weight"] == (256, 512)
    assert plain["attention_net.3.module.3.weight"] == (1, 256)  # index 3: the 0.25 dropout sits at 2
    no_dropout = _shapes(load_slide_model("abmil", in_dim=1024, num_outputs=2, dropout=0.0))
    assert no_dropout["attention_net.3.module.2.weight"] == (1, 256)


def test_clam_checkpoint_quirks_load(tmp_path):
    """DataParallel names, the SmoothTop1SVM buffer, the pre-2022 index-2 layout, and a
    CLAM_SB checkpoint into gated ABMIL; outputs equal the source model's."""
    torch.manual_seed(0)
    source = load_slide_model("clam_sb", in_dim=IN_DIM, num_outputs=2, tiny=True).eval()
    features, coords, mask = _batch()
    expected = source(features, coords, mask)
    state = source.state_dict()

    demo = {k.replace("attention_net.", "attention_net.module.", 1): v for k, v in state.items()}
    demo["instance_loss_fn.labels"] = torch.tensor([0, 1])
    old = {k.replace("attention_net.3.", "attention_net.2.", 1): v for k, v in state.items()}
    for i, (name, checkpoint) in enumerate([("clam_sb", demo), ("clam_sb", old), ("abmil_gated", demo)]):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(checkpoint, path)
        loaded = load_slide_model(name, in_dim=IN_DIM, num_outputs=2, tiny=True, weights=path).eval()
        got = loaded(features, coords, mask)
        torch.testing.assert_close(got.logits, expected.logits)
        torch.testing.assert_close(got.scores, expected.scores)

    # ungated + DataParallel: CLAM's blanket replace('.module', '') would break this one
    plain = load_slide_model("abmil", in_dim=IN_DIM, num_outputs=2, tiny=True).eval()
    path = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in plain.state_dict().items()}, path)
    reloaded = load_slide_model("abmil", in_dim=IN_DIM, num_outputs=2, tiny=True, weights=path).eval()
    torch.testing.assert_close(reloaded(features).logits, plain(features).logits)


def _hand_instance_loss(model, out, b: int, label: int) -> float:
    """CLAM's inst_eval / inst_eval_out for one slide, written out with sorted() and math."""
    n = int(out.extras["mask"][b].sum())
    k = min(model.k_sample, n)
    h = out.extras["tile_features"][b, :n].tolist()
    total = 0.0
    for c, clf in enumerate(model.instance_classifiers):
        row = out.extras["attention"][b, c if model.num_branches > 1 else 0, :n].tolist()
        order = sorted(range(n), key=lambda i: row[i], reverse=True)
        if c == label:
            picks = [(i, 1) for i in order[:k]] + [(i, 0) for i in order[::-1][:k]]
        elif model.subtyping:
            picks = [(i, 0) for i in order[:k]]
        else:
            continue
        w, bias = clf.weight.tolist(), clf.bias.tolist()
        ce = 0.0
        for i, target in picks:
            z = [sum(wj * hj for wj, hj in zip(w[o], h[i])) + bias[o] for o in range(2)]
            ce += math.log(sum(math.exp(v) for v in z)) - z[target]
        total += ce / len(picks)
    return total / len(model.instance_classifiers) if model.subtyping else total


@pytest.mark.parametrize(("name", "subtyping"), [("clam_sb", False), ("clam_mb", True)])
def test_clam_instance_loss_known_answer(name, subtyping):
    torch.manual_seed(1)
    model = load_slide_model(name, in_dim=IN_DIM, num_outputs=3, tiny=True, subtyping=subtyping).eval()
    features, coords, mask = _batch(seed=1)  # third slide has 3 tiles < k_sample = 4
    assert model.k_sample == 4 and model.bag_weight == 0.7
    targets = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(features, coords, mask)
        got = model.auxiliary_loss(out, targets).item()
    expected = sum(_hand_instance_loss(model, out, b, int(t)) for b, t in enumerate(targets)) / 3
    assert got == pytest.approx(expected, rel=1e-5)


def test_clam_instance_loss_rejects_non_class_targets():
    model = load_slide_model("clam_sb", in_dim=IN_DIM, num_outputs=2, tiny=True)
    out = model(*_batch())
    with pytest.raises(ValueError, match="integer class label"):
        model.auxiliary_loss(out, torch.rand(3))


# ------------------------------------------------------------------------- Nyström

def _exact_attention(attn: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) V + res_conv(V), through to_out; x (B, n, dim), no padding."""
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in attn.to_qkv(x).chunk(3, dim=-1))
    out = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v + attn.res_conv(v)
    return attn.to_out(out.transpose(1, 2).flatten(2))


def test_nystrom_with_all_landmarks_is_exact_attention():
    """m = n: landmarks are the tokens themselves and the iterative pinv converges."""
    torch.manual_seed(0)
    attn = NystromAttention(dim=16, heads=2, dim_head=8, num_landmarks=12, pinv_iterations=30).eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64) * 3
    attn.double()
    torch.testing.assert_close(attn(x), _exact_attention(attn, x), atol=1e-6, rtol=1e-6)


def test_nystrom_legacy_padding_shifts_outputs():
    """n = 10, m = 4 → 2 front pad rows; 0.0.9 keeps rows 0..9 of the padded output."""
    torch.manual_seed(0)
    fixed = NystromAttention(dim=16, heads=2, dim_head=8, num_landmarks=4).eval()
    legacy = copy.deepcopy(fixed)
    legacy.legacy_padding = True
    x = torch.randn(1, 10, 16)
    new, old = fixed(x), legacy(x)
    torch.testing.assert_close(old[:, 2:], new[:, :8])
    assert not torch.allclose(old[:, :2], new[:, :2])
    x_exact = torch.randn(1, 12, 16)  # a multiple of m: no padding, no difference
    torch.testing.assert_close(legacy(x_exact), fixed(x_exact))


# ------------------------------------------------------------------------ TransMIL

def test_transmil_square_padding_repeats_first_tokens():
    for n, order in [(5, [0, 1, 2, 3, 4, 0, 1, 2, 3]), (2, [0, 1, 0, 1]), (4, [0, 1, 2, 3]), (1, [0])]:
        tokens = torch.arange(n, dtype=torch.float32).reshape(1, n, 1)
        padded, side = square_pad(tokens)
        assert side * side == len(order)
        assert padded.flatten().tolist() == order


def test_transmil_key_layout_and_size():
    """Spec §4.3: 2,672,146 parameters for n_classes = 2 with 1024-d features."""
    with torch.device("meta"):
        model = load_slide_model("transmil", in_dim=1024, num_outputs=2)
    shapes = _shapes(model)
    assert sum(p.numel() for p in model.parameters()) == 2_672_146
    assert shapes["cls_token"] == (1, 1, 512)
    assert shapes["pos_layer.proj.weight"] == (512, 1, 7, 7)
    assert shapes["pos_layer.proj2.weight"] == (512, 1, 3, 3)
    assert shapes["_fc1.0.weight"] == (512, 1024) and shapes["_fc2.weight"] == (2, 512)
    for layer in ("layer1", "layer2"):
        assert shapes[f"{layer}.attn.to_qkv.weight"] == (1536, 512)
        assert f"{layer}.attn.to_qkv.bias" not in shapes
        assert shapes[f"{layer}.attn.to_out.0.weight"] == (512, 512)
        assert shapes[f"{layer}.attn.res_conv.weight"] == (8, 1, 33, 1)
        assert shapes[f"{layer}.norm.weight"] == (512,)
    assert model.layer1.attn.num_landmarks == 256 and model.layer1.attn.pinv_iterations == 6


def test_transmil_legacy_flag_changes_the_cls_output():
    torch.manual_seed(0)
    model = load_slide_model("transmil", in_dim=IN_DIM, num_outputs=2, tiny=True).eval()
    legacy = load_slide_model("transmil", in_dim=IN_DIM, num_outputs=2, tiny=True, legacy_nystrom_padding=True)
    legacy.load_state_dict(model.state_dict())
    legacy.eval()
    x = torch.randn(1, 20, IN_DIM)  # 1 + 5² = 26 tokens, 16 landmarks → 6 pad rows
    assert not torch.allclose(model(x).logits, legacy(x).logits)


# ------------------------------------------------------------------------ Perceiver

def _reference_perceiver(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int):
    """HistoGPT's resampler written out plainly for one unpadded slide x (N, D).
    Returns latents (L, E) and the last layer's attention (h, L, N + L)."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], state[name + ".weight"], state[name + ".bias"])

    media = x @ state["linear.weight"].T + state["media_pos"][0]
    latents = state["latents"]
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}"
        m, lat = ln(media, f"{p}.0.norm_media"), ln(latents, f"{p}.0.norm_latents")
        q = lat @ state[f"{p}.0.to_q.weight"].T
        k, v = (torch.cat([m, lat]) @ state[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
        d = q.shape[-1] // heads
        outs, attns = [], []
        for hd in range(heads):
            cols = slice(hd * d, (hd + 1) * d)
            a = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=-1)
            attns.append(a)
            outs.append(a @ v[:, cols])
        latents = latents + torch.cat(outs, dim=-1) @ state[f"{p}.0.to_out.weight"].T
        hidden = F.gelu(ln(latents, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T)
        latents = latents + hidden @ state[f"{p}.1.3.weight"].T
    return ln(latents, "norm"), torch.stack(attns)


def test_perceiver_matches_plain_reimplementation():
    torch.manual_seed(0)
    model = load_slide_model("perceiver", in_dim=IN_DIM, num_outputs=NUM_OUTPUTS, tiny=True).eval().double()
    features, coords, mask = _batch()
    out = model(features.double(), coords, mask)
    state = {k.removeprefix("resampler."): v for k, v in model.state_dict().items()}
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        latents, attn = _reference_perceiver(state, features[b, :n].double(), heads=4)
        torch.testing.assert_close(out.extras["latents"][b], latents)
        torch.testing.assert_close(out.embedding[b], latents.mean(0))
        torch.testing.assert_close(out.logits[b], model.head(latents.mean(0)))
        torch.testing.assert_close(out.scores[b, :n], attn[..., :n].mean((0, 1)))
    # the fused (SDPA) path used for inner layers equals the explicit one
    x = model.resampler.linear(features.double()).unsqueeze(1)
    lat = model.resampler.latents.expand(3, 1, -1, -1)
    layer = model.resampler.layers[0][0]
    fused = layer(x, lat, mask.unsqueeze(1))
    explicit, _ = layer(x, lat, mask.unsqueeze(1), return_attention=True)
    torch.testing.assert_close(fused, explicit)


def test_perceiver_default_layout_is_histogpt():
    """Spec §5.2/§5.5 shapes, built on the meta device (the real model is 170M parameters)."""
    with torch.device("meta"):
        model = load_slide_model("perceiver", in_dim=768, num_outputs=0)
    shapes = _shapes(model)
    expected = {"resampler.media_pos": (1, 1, 1536), "resampler.latents": (640, 1536),
                "resampler.linear.weight": (1536, 768), "resampler.norm.weight": (1536,), "resampler.norm.bias": (1536,)}
    for i in range(6):
        p = f"resampler.layers.{i}"
        expected |= {f"{p}.0.norm_media.weight": (1536,), f"{p}.0.norm_media.bias": (1536,),
                     f"{p}.0.norm_latents.weight": (1536,), f"{p}.0.norm_latents.bias": (1536,),
                     f"{p}.0.to_q.weight": (1536, 1536), f"{p}.0.to_kv.weight": (3072, 1536),
                     f"{p}.0.to_out.weight": (1536, 1536), f"{p}.1.0.weight": (1536,), f"{p}.1.0.bias": (1536,),
                     f"{p}.1.1.weight": (6144, 1536), f"{p}.1.3.weight": (1536, 6144)}
    assert shapes == expected


def test_perceiver_loads_histogpt_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = load_slide_model("perceiver", in_dim=IN_DIM, num_outputs=0, tiny=True)
    checkpoint = {"histogpt.perceiver_resampler." + k.removeprefix("resampler."): v.clone()
                  for k, v in source.state_dict().items()}
    checkpoint |= {"histogpt.perceiver_exitgate.weight": torch.randn(16, 32),
                   "histogpt.embed_tokens.weight": torch.randn(10, 16), "output_projection.weight": torch.randn(10, 16)}
    path = tmp_path / "histogpt.pth"
    torch.save(checkpoint, path)
    model = load_slide_model("perceiver", in_dim=IN_DIM, num_outputs=0, tiny=True, weights=path).eval()
    features, coords, mask = _batch()
    state = {k.removeprefix("histogpt.perceiver_resampler."): v for k, v in checkpoint.items()}
    latents, _ = _reference_perceiver(state, features[0], heads=4)
    torch.testing.assert_close(model(features, coords, mask).embedding[0], latents.mean(0), atol=1e-5, rtol=1e-5)
