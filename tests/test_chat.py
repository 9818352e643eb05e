"""The assistant's parts with known answers: the LLaVA template's labels, the projector,
placeholder filling, the loss on answers only, KV-cached decoding continued across calls,
LoRA adapters saved, loaded and merged, run files, tile patch tokens, conversation files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoscope.io.conversations import read_conversations
from histoscope.language.chat import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    apply_lora,
    build_chat_model,
    build_projector,
    get_template,
    load_chat_model,
    merge_lora,
    save_adapter,
    save_chat_model,
    train_chat_tokenizer,
)
from histoscope.language.generation import DecodeState, greedy_or_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QA = [("<image>\nWhat is the diagnosis?", "Melanoma."), ("Is there necrosis?", "No, there is no necrosis.")]


@pytest.fixture(scope="module")
def tokenizer():
    template = get_template("plain")
    texts = template.texts() + [t for turn in QA for t in turn] + [" Melanoma.", " No, there is no necrosis."]
    return train_chat_tokenizer(texts * 3, vocab_size=200)


def _lm_config(tokenizer, **changes):
    return {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **changes}


def _model(tokenizer, **arch):
    torch.manual_seed(0)
    settings = dict(image_dim=12, lm_config=_lm_config(tokenizer), compressor="perceiver", num_image_tokens=3,
                    resampler={"dim": 16, "depth": 1, "dim_head": 8, "heads": 2})
    return build_chat_model(**{**settings, **arch}).eval()


def test_template_labels_answers_only_and_places_the_image(tokenizer):
    template = get_template("plain")
    ids, labels = template.encode(tokenizer, QA, image_tokens=3)
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 3
    answers = [template.answer(tokenizer, answer) for _, answer in QA]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [ids[i] for i in labelled] == answers[0] + answers[1]  # every answer token, end tokens included
    assert [labels[i] for i in labelled] == [ids[i] for i in labelled]
    assert answers[0][-1] == answers[1][-1] == tokenizer.eos_token_id
    # the prompt the assistant sees at inference is the training prefix, token for token
    prompt = template.start(tokenizer) + template.human(tokenizer, QA[0][0], image_tokens=3)
    assert ids[:len(prompt)] == prompt
    assert tokenizer.decode(answers[1]) == "No, there is no necrosis."
    # a text-only conversation: no placeholder, the word <image> dropped
    text_ids, _ = template.encode(tokenizer, QA[:1], image_tokens=0)
    assert IMAGE_TOKEN_INDEX not in text_ids


def test_mlp2x_gelu_projector_is_llavas():
    torch.manual_seed(0)
    projector = build_projector("mlp2x_gelu", in_dim=6, out_dim=5)
    assert list(projector.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # LLaVA's mm_projector keys
    x = torch.randn(2, 3, 6)
    w = projector.state_dict()
    expected = F.linear(F.gelu(F.linear(x, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])
    torch.testing.assert_close(projector(x), expected)
    assert isinstance(build_projector("linear", in_dim=6, out_dim=5), torch.nn.Linear)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp3x", in_dim=6, out_dim=5)


def test_placeholders_filled_in_order_and_loss_on_answers_only(tokenizer):
    model = _model(tokenizer)
    template = get_template("plain")
    ids, labels = template.encode(tokenizer, QA, image_tokens=3)
    text_ids, text_labels = template.encode(tokenizer, QA[1:], image_tokens=0)  # a text-only row in the batch
    width = max(len(ids), len(text_ids))
    batch = torch.full((2, width), tokenizer.pad_token_id)
    target = torch.full((2, width), IGNORE_INDEX)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (i, l) in enumerate(((ids, labels), (text_ids, text_labels))):
        batch[row, :len(i)], target[row, :len(l)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(l), 1
    image = model.image_tokens(torch.randn(1, 7, 12))  # (1, K, E): for the one row with placeholders
    assert image.shape == (1, 3, 32)
    embeds = model.embed(batch, image)
    where = (batch[0] == IMAGE_TOKEN_INDEX).nonzero().flatten()
    torch.testing.assert_close(embeds[0, where], image[0])
    table = model.lm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[1], table[batch[1]])
    out = model(batch, mask, labels=target, image_embeds=image)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits
    rows, cols = (target[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    reference = F.cross_entropy(logits[rows, cols], target[rows, cols + 1])
    torch.testing.assert_close(out.loss, reference)
    with pytest.raises(ValueError, match="image placeholders"):
        model.embed(batch, torch.randn(1, 4, 32))


def test_decoding_continued_from_a_kept_cache_equals_decoding_from_scratch(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**_lm_config(tokenizer))).eval()
    prompt = torch.randint(4, len(tokenizer), (1, 9))
    state = DecodeState()
    first = greedy_or_sample(lm, prompt, max_new_tokens=5, state=state)
    assert state.length == first.shape[1] - 1
    follow_up = torch.cat([first, torch.randint(4, len(tokenizer), (1, 4))], dim=1)
    continued = greedy_or_sample(lm, follow_up, max_new_tokens=6, state=state)
    fresh = greedy_or_sample(lm, follow_up, max_new_tokens=6, use_cache=False)
    assert torch.equal(continued, fresh)
    with pytest.raises(ValueError, match="cache covers"):
        greedy_or_sample(lm, prompt, max_new_tokens=1, state=state)


def test_lora_adapters_save_load_and_merge(tokenizer, tmp_path):
    from peft import PeftModel

    model = _model(tokenizer)
    base_lm = _model(tokenizer).lm  # the same initial weights
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable if n.startswith("lm."))
    with torch.no_grad():  # adapters as if trained (lora_B starts at 0)
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(4, len(tokenizer), (2, 11))
    with torch.no_grad():
        wrapped = model.lm(input_ids=ids).logits
        save_adapter(model, tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(base_lm, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, wrapped)
        merge_lora(model)
        assert not any("lora_" in k for k in model.state_dict())
        torch.testing.assert_close(model.lm(input_ids=ids).logits, wrapped, atol=1e-5, rtol=1e-4)


def test_run_file_with_a_local_lm_folder_keeps_only_adapters(tokenizer, tmp_path):
    lm_dir = tmp_path / "lm"
    _model(tokenizer).lm.save_pretrained(str(lm_dir))
    arch = dict(image_dim=12, lm_path=str(lm_dir), lm_config={}, compressor="attention_pool", num_image_tokens=2)
    torch.manual_seed(1)
    model = build_chat_model(**arch).eval()
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets=["q_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(4, len(tokenizer), (1, 8))
    with torch.no_grad():
        image = model.image_tokens(torch.randn(1, 5, 12))
        expected = model(torch.cat([ids[:, :2], torch.full((1, 2), IMAGE_TOKEN_INDEX), ids], 1),
                         image_embeds=image).logits
    path = save_chat_model(tmp_path / "model.pt", model, arch=arch, template="plain", lm_trained=True)
    stored = torch.load(path, weights_only=True)
    assert not any(k.startswith("lm.") for k in stored["state_dict"])  # the LM stays in its folder
    assert stored["lora"]["settings"]["r"] == 2 and stored["lora"]["state"]
    loaded, meta = load_chat_model(path)
    assert meta["template"] == "plain"
    with torch.no_grad():
        got = loaded(torch.cat([ids[:, :2], torch.full((1, 2), IMAGE_TOKEN_INDEX), ids], 1), image_embeds=image).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_patch_tokens_of_a_vit_tile_encoder():
    from histoscope.encoders import load_tile_encoder

    encoder = load_tile_encoder("uni", weights="random", depth=1, embed_dim=16, num_heads=2)
    x = torch.randn(2, 3, 64, 64)
    tokens = encoder.patch_tokens(x)
    assert tokens.shape == (2, 16, 16)  # (64 / 16)² patches, the class token left out
    torch.testing.assert_close(tokens, encoder.model.forward_features(x)[:, 1:])


def test_conversations_file_bad_items_reported_others_kept(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    from histoscope.io.features_h5 import write_features

    write_features(features / "s1.h5", np.ones((3, 4), np.float32), np.zeros((3, 2)))
    items = [
        {"id": "a", "image": "s1", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "yes"}]},
        {"id": "c", "image": "missing", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "d", "image": "s1", "conversations": [{"from": "human", "value": "Q"}]},
        {"id": "e", "image": "s1", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(items))
    kept, problems = read_conversations(path, features_dir=features)
    assert [c.id for c in kept] == ["a", "b"]
    assert kept[0].image == features / "s1.h5" and kept[1].image is None
    assert kept[0].turns == (("<image>\nQ", "A"),)
    assert len(problems) == 3 and all(str(path) in p for p in problems)
    assert "id c" in problems[0] and "missing.h5" in problems[0]
    assert "no gpt answer" in problems[1] and "where a human question belongs" in problems[2]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a UTF-8 JSON file"):
        read_conversations(path)


@pytest.mark.parametrize("compressor,projector", [("perceiver", "mlp2x_gelu"), ("attention_pool", "linear"),
                                                  ("none", "mlp2x_gelu")])
def test_contract_forward_backward_dtype(tokenizer, compressor, projector):
    """Every assistant shape: every parameter gets a gradient, no NaN, bf16 autocast agrees with fp32."""
    model = _model(tokenizer, compressor=compressor, projector=projector).train()
    template = get_template("plain")
    tokens = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # a padded bag
    k = model.image_tokens(tokens[:1]).shape[1]
    rows = [template.encode(tokenizer, QA, image_tokens=k)] * 2
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    image = model.image_tokens(tokens, mask) if compressor != "none" else model.image_tokens(tokens)
    loss = model(ids, labels=labels, image_embeds=image).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), \
        [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        reference = model(ids, labels=labels, image_embeds=model.image_tokens(tokens, mask)).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, labels=labels, image_embeds=model.image_tokens(tokens, mask)).loss
    assert abs(float(low) - float(reference)) < 0.05 * float(reference)
    if compressor != "none":  # padded tokens change nothing
        trimmed = model.image_tokens(tokens[1:, :4])
        torch.testing.assert_close(model.image_tokens(tokens, mask)[1:], trimmed, atol=1e-5, rtol=1e-4)
