"""HistoGPT: parity with a re-implementation of the reference's forward, strict loading
of the authors' key layout, and the decoding loop (cache, beams, sampling, batching).

The reference below is written from ``histogpt/models/histogpt.py`` (HistoGPT) and
``flamingo_pytorch/flamingo_pytorch.py`` 0.1.2 (FeedForward, PerceiverAttention), with
their module names, so its ``state_dict()`` is a checkpoint in the official layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histoscope.language import generation, get_report_model_spec, list_report_models, load_report_model
from histoscope.io.checkpoint import CheckpointError
from histoscope.language.registry import ReportWeightsError

TINY_LM = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "max_position_embeddings": 64}
TINY_RESAMPLER = {"dim_feats": 16, "dim_model": 24, "dim_head": 8, "num_heads": 2, "num_layers": 2, "num_latents": 6}
EOS = 2  # BioGPT's </s>, where the reference's generate() stops

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# Reference, from the authors' definitions
# ----------------------------------------------------------------------------------------------

def ref_feed_forward(dim, mult=4):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def _heads(t, h):  # (..., n, h·d) -> (..., h, n, d)
    return t.reshape(*t.shape[:-1], h, -1).movedim(-2, -3)


class RefPerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head, heads):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, latents):  # x (b, t, n, D), latents (b, t, l, D)
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))  # b t n (h d) -> b t h n d
        sim = (q * self.scale) @ k.transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v).movedim(-3, -2)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


class RefPerceiverResampler(nn.Module):
    def __init__(self, dim_feats, dim_model, dim_head, num_heads, num_layers, num_latents, num_media=1, ffwn_mult=4):
        super().__init__()
        self.linear = nn.Linear(dim_feats, dim_model, bias=False)
        self.media_pos = nn.Parameter(torch.randn(num_media, 1, dim_model))
        self.latents = nn.Parameter(torch.randn(num_latents, dim_model))
        self.layers = nn.ModuleList([nn.ModuleList([RefPerceiverAttention(dim=dim_model, dim_head=dim_head,
                                                                          heads=num_heads),
                                                    ref_feed_forward(dim_model, ffwn_mult)])
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim_model)

    def forward(self, x):
        x = self.linear(x.float())
        x = x.unsqueeze(1) if x.ndim == 3 else x
        b, m = x.shape[:2]
        x = x + self.media_pos[:m]
        latents = self.latents.repeat(b, m, 1, 1)
        for attn, ffwn in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ffwn(latents)
        return self.norm(latents)


class RefMaskedCrossAttention(nn.Module):
    def __init__(self, *, dim, dim_head, heads):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, media):  # media (b, t, n, d); media_locations=None in HistoGPT
        q = self.to_q(self.norm(x))
        media = media.flatten(1, 2)  # b t n d -> b (t n) d
        k, v = self.to_kv(media).chunk(2, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.to_out(out.reshape(*out.shape[:2], -1))


class RefGatedCrossAttentionBlock(nn.Module):
    def __init__(self, *, dim, dim_head, heads, ff_mult=4):
        super().__init__()
        self.attn = RefMaskedCrossAttention(dim=dim, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.]))
        self.ff = ref_feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.]))

    def forward(self, x, media):
        x = self.attn(x, media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class RefAttention(nn.Module):  # HistoGPTAttention, decoder self-attention, eval mode
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj, self.v_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.q_proj, self.out_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)

    def forward(self, hidden_states, attention_mask):
        b, t, e = hidden_states.shape
        q = _heads(self.q_proj(hidden_states) * self.scaling, self.num_heads)
        k, v = _heads(self.k_proj(hidden_states), self.num_heads), _heads(self.v_proj(hidden_states), self.num_heads)
        weights = torch.softmax(q @ k.transpose(-1, -2) + attention_mask, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, e))


class RefDecoderLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate):
        super().__init__()
        self.self_attn = RefAttention(hidden, heads)
        self.self_attn_layer_norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.final_layer_norm = nn.LayerNorm(hidden)

    def forward(self, h, attention_mask):
        h = h + self.self_attn(self.self_attn_layer_norm(h), attention_mask)
        return h + self.fc2(F.gelu(self.fc1(self.final_layer_norm(h))))  # ACT2FN["gelu"]: exact erf GELU


class RefPositionalEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim):
        self.offset = 2
        super().__init__(num_embeddings + self.offset, embedding_dim)

    def forward(self, attention_mask):
        attention_mask = attention_mask.long()
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask).long() - 1
        return super().forward(positions + self.offset)


class RefHistoGPTModel(nn.Module):
    def __init__(self, lm, rs):
        super().__init__()
        hidden, heads = lm["hidden_size"], lm["num_attention_heads"]
        self.embed_scale = math.sqrt(hidden)  # scale_embedding=True
        self.perceiver_resampler = RefPerceiverResampler(**rs)
        self.perceiver_exitgate = nn.Linear(rs["dim_model"], hidden, bias=False)
        self.embed_tokens = nn.Embedding(lm["vocab_size"], hidden, 1)  # pad_token_id 1
        self.embed_positions = RefPositionalEmbedding(lm["max_position_embeddings"], hidden)
        self.layers = nn.ModuleList([nn.ModuleList([
            RefGatedCrossAttentionBlock(dim=hidden, dim_head=hidden // heads, heads=heads, ff_mult=4),
            RefDecoderLayer(hidden, heads, lm["intermediate_size"])]) for _ in range(lm["num_hidden_layers"])])
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, input_ids, image_ids=None):
        b, t = input_ids.shape
        inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        attention_mask = torch.ones(b, t, dtype=torch.bool)
        positions = self.embed_positions(attention_mask)
        minimum = torch.finfo(inputs_embeds.dtype).min
        causal = torch.full((t, t), minimum).triu(1)[None, None]  # 0 on and below the diagonal
        hidden_states = inputs_embeds + positions
        if image_ids is not None:
            image_embed = self.perceiver_exitgate(self.perceiver_resampler(image_ids))  # (b, 1, L, E)
        for xattn_layer, decoder_layer in self.layers:
            if image_ids is not None:
                hidden_states = xattn_layer(hidden_states, image_embed)
            hidden_states = decoder_layer(hidden_states, causal)
        return self.layer_norm(hidden_states)


class RefHistoGPTForCausalLM(nn.Module):
    def __init__(self, lm, rs):
        super().__init__()
        self.histogpt = RefHistoGPTModel(lm, rs)
        self.output_projection = nn.Linear(lm["hidden_size"], lm["vocab_size"], bias=False)
        self.output_projection.weight = self.histogpt.embed_tokens.weight  # tie_word_embeddings=True

    def forward(self, input_ids, image_ids=None):
        return self.output_projection(self.histogpt(input_ids, image_ids))


def ref_generate_greedy(model, prompt, image, length):
    """The reference's ``helpers/inference.generate`` with arg-max instead of sampling:
    the whole model, resampler included, for every token; stop (without appending) at 2."""
    out = prompt
    for _ in range(length):
        pred = model(out, image)[:, -1].argmax(-1, keepdim=True)
        if pred.item() == EOS:
            break
        out = torch.cat((out, pred), dim=1)
    return out


def make_reference(lm=TINY_LM, rs=TINY_RESAMPLER, seed=0):
    """A reference model with every parameter random (gates open, norms not identity),
    so each part of the forward shows in the logits."""
    torch.manual_seed(seed)
    model = RefHistoGPTForCausalLM(lm, rs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.uniform_(0.3, 1.0, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_positions.weight"):  # as strong as the (scaled) tokens: positions matter
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5)
            elif name.endswith(("embed_tokens.weight", "latents", "media_pos")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(reference model, path of its state_dict saved as the 'official' checkpoint)."""
    ref = make_reference()
    path = tmp_path_factory.mktemp("histogpt") / "histogpt-test-official.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _slide(n=11, d=16, seed=1):
    return torch.randn(1, n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Parity and loading
# ----------------------------------------------------------------------------------------------

def test_official_checkpoint_gives_reference_logits_and_greedy_ids(official):
    ref, path = official
    keys = set(torch.load(path, weights_only=True))
    assert {"output_projection.weight", "histogpt.embed_tokens.weight", "histogpt.perceiver_exitgate.weight",
            "histogpt.layers.1.0.attn.to_kv.weight", "histogpt.layers.1.1.fc1.bias",
            "histogpt.perceiver_resampler.layers.1.0.norm_media.weight"} <= keys
    model = load_report_model("histogpt_test", weights=path).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    features = torch.cat([_slide(seed=1), _slide(seed=2)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, features).logits, ref(ids, features), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, ref(ids), rtol=0, atol=1e-5)  # no image: BioGPT alone
        assert (ref(ids, features) - ref(ids)).abs().max() > 0.1  # the slide matters

    for seed in (1, 2, 3):
        prompt, slide = torch.tensor([[EOS, 17, 5]]), _slide(seed=seed)
        expected = ref_generate_greedy(ref, prompt, slide, length=20)
        ours = model.generate(prompt, slide, max_new_tokens=20)  # eos defaults to the config's (2)
        assert torch.equal(ours[:, :expected.shape[1]], expected)
        if expected.shape[1] < prompt.shape[1] + 20:  # the reference stopped: we end with the end token
            assert ours.shape[1] == expected.shape[1] + 1 and ours[0, -1] == EOS


def test_sizes_are_read_off_the_checkpoint(tmp_path):
    lm = {**TINY_LM, "vocab_size": 50, "num_hidden_layers": 3, "intermediate_size": 48, "max_position_embeddings": 40}
    rs = {**TINY_RESAMPLER, "dim_feats": 20, "num_layers": 1, "num_latents": 5}
    ref = make_reference(lm, rs, seed=4)
    path = tmp_path / "other-sizes.pth"
    torch.save(ref.state_dict(), path)
    model = load_report_model("histogpt_test", weights=path).eval()
    assert model.config.vocab_size == 50 and model.config.num_hidden_layers == 3 and model.dim_feats == 20
    ids, features = torch.randint(3, 50, (1, 6)), _slide(n=7, d=20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, features).logits, ref(ids, features), rtol=0, atol=1e-5)

    # a wider model: heads are not in a checkpoint, so BioGPT's 64-wide heads are assumed unless given
    wide = make_reference({**TINY_LM, "hidden_size": 128, "num_attention_heads": 4}, TINY_RESAMPLER, seed=5)
    torch.save(wide.state_dict(), path)
    assert load_report_model("histogpt_test", weights=path).config.num_attention_heads == 2
    model = load_report_model("histogpt_test", weights=path, lm_config={"num_attention_heads": 4}).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, _slide()).logits, wide(ids, _slide()), rtol=0, atol=1e-5)


def test_our_weights_in_the_official_layout_load_into_the_reference(official):
    ref, path = official
    model = load_report_model("histogpt_test", weights=path)
    other = RefHistoGPTForCausalLM(TINY_LM, TINY_RESAMPLER).eval()
    other.load_state_dict(model.official_state_dict(), strict=True)
    ids = torch.randint(3, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(other(ids, _slide()), ref(ids, _slide()), rtol=0, atol=0)
    # and our own layout (model.state_dict()) loads back through the same loader
    ours = path.parent / "ours.pth"
    torch.save(model.state_dict(), ours)
    again = load_report_model("histogpt_test", weights=ours).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, _slide()).logits, ref(ids, _slide()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing", "extra", "misshapen", "untied"])
def test_a_checkpoint_that_does_not_fit_is_an_error_naming_the_file(official, tmp_path, damage):
    ref, _ = official
    state = dict(ref.state_dict())
    key = "histogpt.layers.1.0.attn.to_q.weight"
    if damage == "missing":
        del state[key]
    elif damage == "extra":
        state["histogpt.layers.1.0.attn.bias"] = torch.zeros(3)
    elif damage == "misshapen":
        state[key] = state[key][:, :-1]
    else:
        state["output_projection.weight"] = state["output_projection.weight"] + 1
    path = tmp_path / f"{damage}.pth"
    torch.save(state, path)
    with pytest.raises(ReportWeightsError) as error:
        load_report_model("histogpt_test", weights=path)
    message = str(error.value)
    assert str(path) in message
    assert ("output_projection.weight" if damage == "untied" else key if damage != "extra"
            else "histogpt.layers.1.0.attn.bias") in message


def test_tied_output_projection_may_be_left_out(official, tmp_path):
    ref, _ = official
    state = {k: v for k, v in ref.state_dict().items() if k != "output_projection.weight"}
    path = tmp_path / "untied-copy-left-out.pth"
    torch.save(state, path)
    model = load_report_model("histogpt_test", weights=path).eval()
    ids = torch.randint(3, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, _slide()).logits, ref(ids, _slide()), rtol=0, atol=1e-5)


def test_unreadable_checkpoint_and_bad_configs(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_report_model("histogpt_test", weights=bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_report_model("histogpt_test", weights=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="hidden_sise"):
        load_report_model("histogpt_test", lm_config={"hidden_sise": 8})
    with pytest.raises(ValueError, match="dim_heads"):
        load_report_model("histogpt_test", resampler_config={"dim_heads": 8})
    with pytest.raises(KeyError, match="histogpt_test"):
        load_report_model("histogpt_tset")


# ----------------------------------------------------------------------------------------------
# Contract over every registered report model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_report_models())
def test_report_model_contract(name):
    """Forward shapes, the Flamingo init (closed gates: the slide changes nothing), a
    gradient for every parameter, padding invariance of features, no NaN."""
    torch.manual_seed(0)
    model = load_report_model(name, tiny=True)
    vocab, d = model.config.vocab_size, model.dim_feats
    ids = torch.randint(3, vocab, (3, 6))
    gen = torch.Generator().manual_seed(0)
    counts = (9, 4, 1)
    features = torch.randn(3, max(counts), d, generator=gen)
    mask = torch.arange(max(counts))[None] < torch.tensor(counts)[:, None]  # (B, N)
    features[~mask] = float("nan")  # padding must not leak, not even as NaN

    model.eval()
    with torch.no_grad():
        closed = model(ids, features, mask).logits
        assert closed.shape == (3, 6, vocab) and torch.isfinite(closed).all()
        torch.testing.assert_close(closed, model(ids).logits)  # gates start at 0: BioGPT unchanged

    with torch.no_grad():
        for layer in model.fusion_layers:
            layer.block.attn_gate.fill_(0.5)
            layer.block.ff_gate.fill_(-0.5)
    model.train()
    out = model(ids, features, mask, labels=ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    bad_grad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert not bad_grad, f"parameters with non-finite gradient: {bad_grad}"

    model.eval()
    with torch.no_grad():
        batched = model(ids, features, mask).logits
        assert torch.isfinite(batched).all()
        for b, n in enumerate(counts):
            alone = model(ids[b:b + 1], features[b:b + 1, :n]).logits
            torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(official):
    return load_report_model("histogpt_test", weights=official[1]).eval()


@pytest.fixture(scope="module")
def position_sensitive(official):
    """The test model with positions outweighing tokens: a position off by one changes the ids."""
    model = load_report_model("histogpt_test", weights=official[1]).eval()
    with torch.no_grad():
        model.lm.base_model.embed_positions.weight.mul_(4)
    return model


def test_cached_uncached_and_full_forward_decoding_agree(model):
    prompt, slide = torch.tensor([[EOS, 9, 30, 4]]), _slide(seed=7)
    cached = model.generate(prompt, slide, max_new_tokens=24, eos_token_id=None)
    uncached = model.generate(prompt, slide, max_new_tokens=24, eos_token_id=None, use_cache=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(24):  # the reference's way: the whole model for every token
            ids = torch.cat([ids, model(ids, slide).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (1, 4 + 24)
    assert torch.equal(cached, uncached) and torch.equal(cached, ids)


def test_beam_search_with_one_beam_is_greedy(model):
    prompt, slide = torch.tensor([[EOS, 11, 3], [EOS, 40, 21]]), torch.cat([_slide(seed=8), _slide(seed=9)])
    for eos in (None, [EOS, 7, 12]):  # with end tokens some rows finish early
        greedy = model.generate(prompt, slide, max_new_tokens=16, eos_token_id=eos)
        with torch.no_grad(), model.conditioned_on(model.media_kv(model.encode(slide))):
            beam = generation.beam_search(model.lm, prompt, max_new_tokens=16, num_beams=1, eos_token_id=eos,
                                          pad_token_id=model.config.pad_token_id)
        assert torch.equal(beam, greedy)


def test_beam_search_cached_equals_uncached(position_sensitive):
    """Beams swap places, so the transformers cache must be reordered with them."""
    model = position_sensitive
    prompt, slides = torch.tensor([[EOS, 11, 3], [EOS, 4, 60]]), torch.cat([_slide(seed=10), _slide(seed=12)])
    for num_beams in (2, 4):
        kwargs = {"max_new_tokens": 16, "num_beams": num_beams, "eos_token_id": None}
        assert torch.equal(model.generate(prompt, slides, **kwargs),
                           model.generate(prompt, slides, use_cache=False, **kwargs))


class HistoryLM(nn.Module):
    """A causal LM in the Hugging Face call convention whose next-token log-probabilities
    depend on the last token and the sum of all tokens so far (kept in a tuple 'cache'),
    so a cache that is not reordered with its beams gives wrong answers."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V, V) log-probabilities: [sum of tokens mod V, last token] -> next

    def log_probs(self, ids):  # (B, T) -> (B, T, V)
        return self.table[ids.cumsum(-1) % self.table.shape[0], ids]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        past = past_key_values[0][0] if past_key_values is not None else input_ids[:, :0]
        seen = torch.cat([past, input_ids], 1)
        out = type("Out", (), {})()
        out.logits = self.log_probs(seen)[:, past.shape[1]:]
        out.past_key_values = ((seen, seen),) if use_cache else None
        return out


def test_beam_search_finds_the_best_sequence_when_beams_cover_every_prefix():
    vocab, steps = 4, 4
    table = torch.randn(vocab, vocab, vocab, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    lm = HistoryLM(table)
    prompt = torch.tensor([[0], [3]])
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * steps)  # every continuation
    for use_cache in (True, False):
        best = generation.beam_search(lm, prompt, max_new_tokens=steps, num_beams=vocab ** (steps - 1),
                                      use_cache=use_cache)
        for b in range(2):
            full = torch.cat([prompt[b].expand(len(seqs), 1), seqs], 1)
            scores = lm.log_probs(full)[:, :-1].gather(-1, full[:, 1:, None]).sum((1, 2))
            assert torch.equal(best[b], full[scores.argmax()])
    # greedy follows the arg-max, step by step
    greedy = generation.generate(lm, prompt, max_new_tokens=steps)
    for b in range(2):
        ids = prompt[b:b + 1]
        for _ in range(steps):
            ids = torch.cat([ids, lm.log_probs(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(greedy[b], ids[0])


def test_filter_logits_known_answers():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(generation.filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(generation.filter_logits(logits, top_k=2)[0, :2]).all()
    probs = torch.tensor([[0.2, 0.5, 0.3]]).log()
    kept = lambda p: torch.isfinite(generation.filter_logits(probs, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, True]  # 0.5 is not enough, 0.5 + 0.3 is
    assert kept(0.5) == [False, True, False]
    assert kept(0.1) == [False, True, False]  # at least one token
    assert kept(1.0) == [True, True, True]


def test_sampling_is_reproducible_under_a_seed_and_top_k_1_is_greedy(model):
    prompt, slide = torch.tensor([[EOS, 9, 30]]), _slide(seed=11)
    state = torch.get_rng_state()
    kwargs = {"max_new_tokens": 20, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "eos_token_id": None}
    first = model.generate(prompt, slide, seed=123, **kwargs)
    assert torch.equal(first, model.generate(prompt, slide, seed=123, **kwargs))
    assert not torch.equal(first, model.generate(prompt, slide, seed=124, **kwargs))
    assert torch.equal(torch.get_rng_state(), state)  # a seeded call leaves the global RNG alone
    greedy = model.generate(prompt, slide, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(model.generate(prompt, slide, max_new_tokens=20, do_sample=True, top_k=1, seed=0,
                                      eos_token_id=None), greedy)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_slides_and_prompts_equal_one_at_a_time(position_sensitive, num_beams):
    """Slides of 13, 5 and 1 tiles (padded) with prompts of 4, 1 and 3 tokens (left-padded)."""
    model = position_sensitive
    counts, prompts = (13, 5, 1), [[EOS, 9, 30, 4], [EOS], [EOS, 50, 6]]
    slides = [_slide(n=n, seed=20 + i) for i, n in enumerate(counts)]
    features = torch.zeros(3, max(counts), 16)
    mask = torch.zeros(3, max(counts), dtype=torch.bool)
    for b, s in enumerate(slides):
        features[b, :s.shape[1]], mask[b, :s.shape[1]] = s[0], True
    ids, attention = generation.left_pad(prompts, pad_token_id=model.config.pad_token_id)
    kwargs = {"max_new_tokens": 12, "num_beams": num_beams, "eos_token_id": [EOS, 7]}
    batched = model.generate(ids, features, mask, attention_mask=attention, **kwargs)
    for b in range(3):
        alone = model.generate(torch.tensor([prompts[b]]), slides[b], **kwargs)[0]
        row = batched[b, ids.shape[1] - len(prompts[b]):]  # drop the left padding
        assert torch.equal(row[:len(alone)], alone)
        assert (row[len(alone):] == model.config.pad_token_id).all()  # finished early: padded


def test_bad_generation_requests_are_refused(model):
    ids = torch.tensor([[EOS, 5, 1], [EOS, 6, 7]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, _slide(), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="64 positions"):
        model.generate(ids, _slide(), max_new_tokens=62)
    with pytest.raises(ValueError, match="dim_feats=16"):
        model.generate(ids, torch.randn(2, 5, 15), max_new_tokens=2)
    with pytest.raises(ValueError, match="3 slides for 2 prompts"):
        model.generate(ids, torch.randn(3, 5, 16), max_new_tokens=2)


def test_ensemble_refinement_samples_reports_and_summarises_them(model):
    from histoscope.language.refine import DEFAULT_INSTRUCTION, ensemble_refinement

    prompt, slide = torch.tensor([[EOS, 9, 30]]), _slide(seed=13)
    seen = []
    result = ensemble_refinement(model, prompt, slide, decode=lambda ids: " ".join(map(str, ids)),
                                 summarize=lambda text: seen.append(text) or "summary", num_samples=4,
                                 max_new_tokens=12, seed=5)
    assert result.summary == "summary" and seen == [result.prompt]
    samples = model.generate(prompt.expand(4, -1), slide, max_new_tokens=12, do_sample=True, top_k=40, top_p=0.95,
                             seed=5)
    assert len(result.reports) == 4
    for report, sample in zip(result.reports, samples):
        assert torch.equal(report[:3], prompt[0]) and EOS not in report[3:].tolist()
        assert torch.equal(report, sample[:len(report)])
        assert len(report) == len(sample) or sample[len(report)] == EOS  # cut exactly at the end token
    # the reference decodes all samples joined, less the very first token, after the instruction
    joined = torch.cat(result.reports).tolist()[1:]
    assert result.prompt == DEFAULT_INSTRUCTION + " ".join(map(str, joined))


def test_biogpt_weights_load_into_the_decoder_and_give_biogpt_logits():
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(6)
    biogpt = BioGptForCausalLM(BioGptConfig(**TINY_LM)).eval()
    with torch.no_grad():
        for p in biogpt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = load_report_model("histogpt_test").eval()
    resampler_before = model.resampler.latents.clone()
    model.load_biogpt_state_dict(biogpt.state_dict())
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, biogpt(input_ids=ids).logits, rtol=0, atol=1e-5)
        # closed gates (a fresh model): the slide does not change BioGPT's output yet
        torch.testing.assert_close(model(ids, _slide().expand(2, -1, -1)).logits, biogpt(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    assert torch.equal(model.resampler.latents, resampler_before)
    with pytest.raises(KeyError, match="missing"):
        model.load_biogpt_state_dict({k: v for k, v in biogpt.state_dict().items() if "layers.1.fc2" not in k})


@pytest.mark.parametrize("name", ["histogpt", "histogpt_3b"])
def test_published_configs_have_the_reference_key_layout(name):
    """The 1B (BioGptConfig()) and 3B (BioGPT-Large) models, built on the meta device:
    every key and shape of the reference's state dict, and nothing else."""
    spec = get_report_model_spec(name)
    with torch.device("meta"):
        ours = load_report_model(name)
        ref = RefHistoGPTForCausalLM(spec.lm_config, spec.resampler_config)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    assert shapes(ours.official_state_dict()) == shapes(ref.state_dict())
    assert ours.config.hidden_size == {"histogpt": 1024, "histogpt_3b": 1600}[name]
