"""Image–text models: losses against their definitions, retrieval ranks by hand, prompt
ensembles, the temperature, and a contract test over every registered model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoscope.eval.cross_modal import image_text_retrieval, recall_at_k, retrieval_ranks
from histoscope.language.align import (
    ClassPrompts,
    TextTokenizer,
    caption_loss,
    clip_loss,
    list_align_models,
    load_align_model,
    train_bpe_tokenizer,
    zero_shot_classifier,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(name: str):
    """Every registered model at test size, with the inputs its image tower reads."""
    torch.manual_seed(0)
    if name == "clip":
        model = load_align_model("clip", tiny=True, features_dim=12, vocab_size=50, decoder_layers=1)
        return model, torch.randn(3, 5, 12), torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    return load_align_model(name, tiny=True), torch.randn(3, 3, 32, 32), None


def _ids(model, batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.text.token_embedding.num_embeddings
    ids = torch.randint(3, vocab, (batch, 12), generator=generator)
    ids[:, 0] = 1
    for row in range(batch):
        end = 4 + 3 * row
        ids[row, end] = 2
        ids[row, end + 1:] = 0
    return ids


# --- losses ---


def test_clip_loss_is_clips_symmetric_cross_entropy():
    """CLIP's pseudo-code: logits = I·Tᵀ·exp(t); (CE over rows + CE over columns) / 2, in float64 numpy."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 8))
    texts = images + 0.7 * rng.standard_normal((6, 8))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    scale = 1 / 0.07
    logits = images @ texts.T * scale

    def cross_entropy(z, axis):  # -log softmax of the diagonal along ``axis``
        log_softmax = z - np.log(np.exp(z - z.max(axis, keepdims=True)).sum(axis, keepdims=True)) - z.max(axis, keepdims=True)
        return -np.mean(np.diag(log_softmax))

    expected = (cross_entropy(logits, 0) + cross_entropy(logits, 1)) / 2
    value = clip_loss(torch.tensor(images, dtype=torch.float32), torch.tensor(texts, dtype=torch.float32),
                      torch.tensor(scale))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    perfect = torch.eye(4)
    assert clip_loss(perfect, perfect, torch.tensor(100.0)).item() == pytest.approx(0, abs=1e-6)
    assert clip_loss(perfect, perfect[[1, 0, 2, 3]], torch.tensor(1.0)).item() > math.log(4) - 1


def test_caption_loss_is_token_cross_entropy_shifted_by_one_with_pad_ignored():
    model, x, mask = _tiny("conch")
    ids = _ids(model)
    output = model(x, ids, mask)
    assert torch.equal(output.caption_labels, ids[:, 1:])  # position t predicts token t + 1
    logits = output.caption_logits.detach().double()
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = int(ids[b, t + 1])
            if target != 0:
                total -= float(torch.log_softmax(logits[b, t], -1)[target])
                count += 1
    expected = total / count
    assert caption_loss(output.caption_logits, output.caption_labels, pad_id=0).item() == pytest.approx(expected, rel=1e-5)


def test_captioning_decoder_is_causal():
    """Logits at positions up to t do not change when a later token changes."""
    model, x, mask = _tiny("conch")
    model.eval()
    ids = _ids(model)
    changed = ids.clone()
    changed[:, 6] = 9
    with torch.no_grad():
        before, after = model(x, ids, mask).caption_logits, model(x, changed, mask).caption_logits
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_temperature_starts_at_clip_value_and_is_clamped_at_100():
    model, _, _ = _tiny("conch")
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


# --- retrieval ---


def test_recall_at_k_by_hand_with_ties_counted_against_the_query():
    similarity = np.array([
        [0.9, 0.1, 0.2, 0.0],  # correct 0 is the best: rank 1
        [0.8, 0.5, 0.5, 0.1],  # correct 1 ties with 2, below 0: rank 3
        [0.3, 0.3, 0.3, 0.3],  # all tied: rank 4
        [0.1, 0.2, 0.3, 0.25],  # correct 3 below 2 only: rank 2
    ])
    assert retrieval_ranks(similarity).tolist() == [1, 3, 4, 2]
    assert recall_at_k(similarity, ks=(1, 2, 3, 4)) == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 1.0}
    assert retrieval_ranks(similarity, targets=[2, 0, 3, 1]).tolist() == [2, 1, 4, 3]


def test_image_text_retrieval_both_directions():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = np.array([[2.0, 0.5], [0.0, 3.0], [0.1, 2.0]])  # caption 2 points nearer image 1 than image 2
    metrics = image_text_retrieval(images, texts, ks=(1, 2))
    # image 2 ~ (1,1): caption 0 0.86 > caption 2 0.74 (rank 2); caption 2: image 1 1.00 > image 2 0.74 (rank 2)
    assert metrics["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_R@2"] == metrics["text_to_image_R@2"] == 1.0


# --- zero-shot prompts ---


@pytest.fixture(scope="module")
def tokenizer():
    captions = ["an image of tumor.", "stroma.", "a photomicrograph of carcinoma.", "normal mucosa"] * 4
    return TextTokenizer(train_bpe_tokenizer(captions, vocab_size=120), context_length=16, reserve_cls=True)


def test_prompt_ensemble_averages_normalised_embeddings_then_renormalises(tokenizer):
    torch.manual_seed(0)
    model = load_align_model("clip", tiny=True, features_dim=8, vocab_size=tokenizer.vocab_size,
                             context_length=16).eval()
    prompts = ClassPrompts({"tumor": ["tumor", "carcinoma"], "normal": ["normal mucosa"]},
                           ("an image of CLASSNAME.", "CLASSNAME."))
    weights = zero_shot_classifier(model, tokenizer, prompts)
    assert weights.shape == (32, 2)
    expected = []
    with torch.no_grad():
        for names in (["tumor", "carcinoma"], ["normal mucosa"]):
            texts = [t.replace("CLASSNAME", n) for n in names for t in ("an image of CLASSNAME.", "CLASSNAME.")]
            rows = [F.normalize(model.encode_text(tokenizer([text]), normalize=False), dim=-1)[0] for text in texts]
            mean = torch.stack(rows).mean(0)
            expected.append(mean / mean.norm())
    torch.testing.assert_close(weights, torch.stack(expected, 1), atol=1e-6, rtol=1e-5)
    assert torch.allclose(weights.norm(dim=0), torch.ones(2))
    assert prompts.prompts("tumor") == ["an image of tumor.", "tumor.", "an image of carcinoma.", "carcinoma."]


def test_prompts_files_conch_json_and_yaml(tmp_path):
    conch_style = {"0": {"classnames": {"ADI": ["adipose", "fat"], "TUM": ["tumor"]},
                         "templates": ["CLASSNAME.", "an image of CLASSNAME."]}}
    (tmp_path / "prompts.json").write_text(json.dumps(conch_style))
    prompts = ClassPrompts.from_file(tmp_path / "prompts.json")
    assert prompts.labels == ["ADI", "TUM"] and prompts.prompts("ADI")[1] == "an image of adipose."
    (tmp_path / "prompts.yaml").write_text("classnames:\n  a: alpha\n  b: [beta]\n")
    assert ClassPrompts.from_file(tmp_path / "prompts.yaml").prompts("a") == ["alpha."]
    (tmp_path / "bad.yaml").write_text("classnames: {a: [alpha]}\ntemplates: ['no placeholder']\n")
    with pytest.raises(ValueError, match="bad.yaml.*CLASSNAME"):
        ClassPrompts.from_file(tmp_path / "bad.yaml")


# --- every registered model ---


@pytest.mark.parametrize("name", list_align_models())
def test_contract_forward_backward_dtype(name):
    model, x, mask = _tiny(name)
    ids = _ids(model)
    output = model(x, ids, mask)
    assert output.image_embedding.shape == output.text_embedding.shape == (3, model.text.text_projection.shape[1])
    assert torch.allclose(output.image_embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
    loss = clip_loss(output.image_embedding, output.text_embedding, output.logit_scale) + caption_loss(
        output.caption_logits, output.caption_labels, pad_id=model.pad_id)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    model.eval()
    with torch.no_grad():
        reference = model.encode_image(x, mask), model.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(x, mask), model.encode_text(ids)
    for a, b in zip(reference, low):
        assert torch.isfinite(b).all()
        assert F.cosine_similarity(a, b.float(), dim=-1).min() > 0.98


def test_padded_feature_tokens_do_not_change_a_bag():
    model, x, mask = _tiny("clip")
    model.eval()
    with torch.no_grad():
        short = model.encode_image(x[1:2, :3])
        padded = x[1:2].clone()
        padded[0, 3:] = 100.0  # garbage behind the mask
        assert torch.allclose(model.encode_image(padded, mask[1:2]), short, atol=1e-6)
        ids = _ids(model, batch=1)
        logits = model(x[1:2, :3], ids).caption_logits
        assert torch.allclose(model(padded, ids, mask[1:2]).caption_logits, logits, atol=1e-5)


def test_unknown_architecture_keywords_are_errors():
    with pytest.raises(ValueError, match="'text_layer' \\(did you mean 'text_layers'\\?\\) not arguments of"):
        load_align_model("clip", tiny=True, features_dim=4, vocab_size=40, text_layer=3)
