"""CONCH's published key layout: a tiny checkpoint written by a re-implementation of the
reference CoCa (conch/open_clip_custom: coca_model.py, transformer.py, vision_tower.py)
loads strictly into ``load_align_model("conch")`` and gives the same embeddings and
caption logits; CONCH's tokenisation settings; strict-loading errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from histoscope.language.align import AlignWeightsError, TextTokenizer, load_align_model, train_bpe_tokenizer
from histoscope.language.align.coca import cls_attention_mask
from histoscope.language.align.builders import CONCH_ARCH, CONCH_TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {**CONCH_ARCH, **CONCH_TINY}


# --- reference CoCa, re-implemented from the reference code's definitions (seq-first, explicit attention) ---


def _attention(x_q, x_kv, in_w, in_b, out: nn.Linear, heads: int, mask=None):
    """nn.MultiheadAttention's maths written out: (L, N, C) queries, (S, N, C) keys/values."""
    length, batch, width = x_q.shape
    w_q, w_k, w_v = in_w.chunk(3)
    b_q, b_k, b_v = in_b.chunk(3)
    q, k, v = F.linear(x_q, w_q, b_q), F.linear(x_kv, w_k, b_k), F.linear(x_kv, w_v, b_v)

    def split(t):  # (L, N, C) -> (N·H, L, C/H), heads of a sample adjacent
        return t.reshape(t.shape[0], batch * heads, width // heads).transpose(0, 1)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(1, 2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    y = scores.softmax(-1) @ v  # (N·H, L, C/H)
    return out(y.transpose(0, 1).reshape(length, batch, width))


class RefBlock(nn.Module):
    def __init__(self, width, heads, cross=False):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        if cross:
            self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, q_x, k_x=None, attn_mask=None):  # (L, N, C) as in open_clip
        kv = self.ln_1_kv(k_x) if k_x is not None else self.ln_1(q_x)
        x = q_x + _attention(self.ln_1(q_x), kv, self.attn.in_proj_weight, self.attn.in_proj_bias,
                             self.attn.out_proj, self.heads, attn_mask)
        return x + self.mlp(self.ln_2(x))


class RefPooler(nn.Module):
    def __init__(self, d_model, context_dim, n_head, n_queries):
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):  # (N, L, D)
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class RefVisual(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.trunk = VisionTransformer(embed_dim=a["vision_width"], depth=a["vision_depth"],
                                       num_heads=a["vision_heads"], mlp_ratio=4, img_size=a["img_size"],
                                       patch_size=a["patch_size"], num_classes=0, dynamic_img_size=True)
        self.attn_pool_contrast = RefPooler(a["embed_dim"], a["vision_width"], a["pool_heads"], 1)
        self.ln_contrast = nn.LayerNorm(a["embed_dim"])
        self.proj_contrast = nn.Parameter(torch.empty(a["embed_dim"], a["embed_dim"]))
        self.head = nn.Sequential()
        self.attn_pool_caption = RefPooler(a["text_width"], a["vision_width"], a["pool_heads"], a["caption_queries"])
        self.ln_caption = nn.LayerNorm(a["text_width"])

    def forward(self, images):
        x = self.trunk.forward_features(images)
        pooled = self.ln_contrast(self.attn_pool_contrast(x)[:, 0]) @ self.proj_contrast
        return pooled, self.ln_caption(self.attn_pool_caption(x))


class RefText(nn.Module):
    def __init__(self, a):
        super().__init__()
        width, self.heads, self.pad_id = a["text_width"], a["text_heads"], a["pad_id"]
        self.num_pos = a["context_length"]
        self.text_projection = nn.Parameter(torch.empty(width, a["embed_dim"]))
        self.cls_emb = nn.Parameter(torch.empty(width))
        self.token_embedding = nn.Embedding(a["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.empty(self.num_pos, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(RefBlock(width, self.heads) for _ in range(a["text_layers"]))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, text):
        mask = torch.empty(self.num_pos, self.num_pos).fill_(float("-inf")).triu_(1)  # build_attention_mask
        seq_len = text.shape[1] + 1
        x = torch.cat([self.token_embedding(text), self.cls_emb.reshape(1, 1, -1).repeat(text.shape[0], 1, 1)], 1)
        cls_mask = F.pad((text != self.pad_id).unsqueeze(1), (1, 0, text.shape[1], 0), value=1.0)  # build_cls_mask
        additive = torch.zeros(cls_mask.shape).masked_fill_(~cls_mask, float("-inf"))
        additive = torch.repeat_interleave(additive, self.heads, 0)
        mask = mask[None, :seq_len, :seq_len] + additive[:, :seq_len, :seq_len]
        x = (x + self.positional_embedding[:seq_len]).permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = x.permute(1, 0, 2)
        return self.ln_final(x[:, -1]) @ self.text_projection, x[:, :-1]


class RefDecoder(nn.Module):
    def __init__(self, a):
        super().__init__()
        width, layers = a["text_width"], a["decoder_layers"]
        self.context_length = a["context_length"]
        self.resblocks = nn.ModuleList(RefBlock(width, a["text_heads"]) for _ in range(layers))
        self.cross_attn = nn.ModuleList(RefBlock(width, a["text_heads"], cross=True) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, a["vocab_size"]))

    def forward(self, image_embs, text_embs):
        n = text_embs.shape[1]
        mask = torch.empty(self.context_length, self.context_length).fill_(float("-inf")).triu_(1)[:n, :n]
        x, image = text_embs.permute(1, 0, 2), image_embs.permute(1, 0, 2)
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = block(x, attn_mask=mask)
            x = cross(x, k_x=image)
        return self.ln_final(x.permute(1, 0, 2)) @ self.text_projection


class RefCoCa(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.text = RefText(a)
        self.visual = RefVisual(a)
        self.text_decoder = RefDecoder(a)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, images):
        return F.normalize(self.visual(images)[0], dim=-1)

    def encode_text(self, text):
        return F.normalize(self.text(text[:, :-1])[0], dim=-1)

    def forward(self, image, text):
        token_embs = self.text(text[:, :-1])[1]
        logits = self.text_decoder(self.visual(image)[1], token_embs)
        return logits, text[:, -token_embs.shape[1]:]


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    reference = RefCoCa(TINY).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name != "logit_scale":  # every tensor random, norms included, so a swapped key shows
                parameter.copy_(torch.randn_like(parameter) * (0.5 if parameter.ndim > 1 else 0.2)
                                + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "norm.weight")) else 0.0))
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    return reference, path


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 48, 32, generator=generator)  # not square: dynamic image size
    ids = torch.randint(3, TINY["vocab_size"], (3, TINY["context_length"]), generator=generator)
    ids[:, 0] = 1
    for row, length in enumerate((5, 9, TINY["context_length"] - 1)):  # the last caption fills the context
        ids[row, length - 1] = 2
        ids[row, length:] = 0
    return images, ids


def test_official_layout_loads_strictly_and_matches_the_reference(reference_checkpoint):
    reference, path = reference_checkpoint
    model = load_align_model("conch", weights=path, tiny=True).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    images, ids = _inputs()
    with torch.no_grad():
        expected_image, expected_text = reference.encode_image(images), reference.encode_text(ids)
        expected_logits, expected_labels = reference(images, ids)
        output = model(images, ids)
        torch.testing.assert_close(model.encode_image(images), expected_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.image_embedding, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.text_embedding, expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.caption_logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(output.caption_labels, expected_labels)
    assert output.logit_scale.item() == pytest.approx(1 / 0.07)


def test_class_token_mask_is_open_clips():
    """Known answer: the class token (last row) sees key k if k == 0 or token k-1 is not padding."""
    ids = torch.tensor([[1, 5, 2, 0, 0], [1, 5, 6, 7, 2]])
    mask = cls_attention_mask(ids, pad_id=0)
    inf = float("-inf")
    assert mask.shape == (2, 6, 6)
    assert mask[0, -1].tolist() == [0, 0, 0, 0, inf, inf]  # sees the first pad after <eot>, not itself
    assert mask[1, -1].tolist() == [0] * 6  # a full caption: everything, itself included
    assert (mask[:, :-1] == 0).all()  # the caption's own rows are left to the causal mask


def test_published_arch_is_the_reference_config():
    model = load_align_model("conch")
    state = model.state_dict()
    assert state["text.token_embedding.weight"].shape == (32007, 768)
    assert state["text.positional_embedding"].shape == (128, 768)
    assert state["text.text_projection"].shape == (768, 512)
    assert state["text_decoder.text_projection"].shape == (768, 32007)
    assert state["visual.attn_pool_caption.query"].shape == (256, 768)
    assert state["visual.proj_contrast"].shape == (512, 512)
    assert state["visual.trunk.pos_embed"].shape == (1, 1 + 28 * 28, 768)
    assert len([k for k in state if k.startswith("text.transformer.resblocks.") and k.endswith("ln_1.weight")]) == 12
    assert len([k for k in state if k.startswith("text_decoder.cross_attn.") and k.endswith("ln_1_kv.weight")]) == 12


def test_a_checkpoint_that_does_not_fit_names_its_keys(reference_checkpoint, tmp_path):
    reference, _ = reference_checkpoint
    state = dict(reference.state_dict())
    del state["text.cls_emb"]
    state["text.extra"] = torch.zeros(1)
    state["visual.proj_contrast"] = torch.zeros(3, 3)
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(AlignWeightsError) as error:
        load_align_model("conch", weights=path, tiny=True)
    message = str(error.value)
    assert str(path) in message and "text.cls_emb" in message and "text.extra" in message
    assert "visual.proj_contrast (checkpoint (3, 3), model (16, 16))" in message
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(AlignWeightsError, match="empty"):
        load_align_model("conch", weights=tmp_path / "empty.bin", tiny=True)


# --- CONCH's tokenisation: PreTrainedTokenizerFast with its special tokens, 127 tokens + one pad ---


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    captions = ["Invasive ductal carcinoma of the breast, H&E stain.", "Lymphocytes in a lymph node.",
                "Adipose tissue with scattered vessels.", "Necrotic debris next to tumour cells."] * 5
    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(captions, vocab_size=300).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_tokenisation_follows_conch_tokenize(tokenizer_file):
    from transformers import PreTrainedTokenizerFast

    texts = ["Invasive CARCINOMA, H&E stain", "lymph node " * 40, "Àdipose"]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<start_of_text>",
                                        eos_token="<end_of_text>", pad_token="<pad>")
    expected = reference(texts, max_length=15, add_special_tokens=True, return_token_type_ids=False,
                         truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    expected = F.pad(expected, (0, 1), value=reference.pad_token_id)
    tokenizer = TextTokenizer.load(tokenizer_file, context_length=16, reserve_cls=True)
    ids = tokenizer(texts)
    assert torch.equal(ids, expected)
    assert ids.shape == (3, 16) and tokenizer.pad_id == 0
    assert (ids[:, 0] == 1).all() and (ids[:, -1] == 0).all()
    assert ids[1, 14] == 2  # a long caption is cut with its end token kept
    assert tokenizer.decode(ids[0]) == tokenizer.decode(tokenizer(["invasive carcinoma, h&e stain"])[0])  # uncased
    assert tokenizer.decode(ids[2]).strip() == "adipose"  # accents stripped


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        TextTokenizer.load(tmp_path, context_length=8, reserve_cls=True)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        TextTokenizer.load(bad, context_length=8, reserve_cls=True)
