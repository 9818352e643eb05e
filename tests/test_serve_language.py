"""histoscope serve over the language models' real outputs. The report panel: what `histoscope report`
wrote (a tiny HistoGPT in the authors' layout) is what /api/slides/{id}/report returns. Chat, with a real assistant: ``POST /api/slides/{id}/chat`` over a run folder of
``histoscope train-chat`` (a tiny ChatModel saved in that format) answers what the assistant answers
for the same features file and conversation; a slide without features is a clear 404, one with another
encoder's features a 422 naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from histoscope.io.features_h5 import features_folder, features_path, write_features  # noqa: E402
from histoscope.io.sample import make_sample_slide  # noqa: E402
from histoscope.language.chat import Assistant, build_chat_model, get_template, save_chat_model  # noqa: E402
from histoscope.language.chat.tokenizer import train_chat_tokenizer  # noqa: E402
from histoscope.language.chat.trained import chat_model_path, save_chat_tokenizer  # noqa: E402
from histoscope.language.report_text import train_report_tokenizer  # noqa: E402
from histoscope.serve.app import create_app  # noqa: E402
from histoscope.serve.chat import load_chat_backend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Q1, Q2 = "What is the diagnosis?", "Is there necrosis?"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """slides/ with two small slides; OUT with features of one (``features_uni``); a chat run folder
    (tokenizer + ``model.pt``) as train-chat writes it, with random weights (answers are not the point)."""
    base = tmp_path_factory.mktemp("serve_chat")
    slides, out, run = base / "slides", base / "out", base / "run"
    slides.mkdir()
    for name, seed in (("with_features", 1), ("without_features", 2), ("other_encoder", 3)):
        make_sample_slide(slides / f"{name}.tiff", width=512, height=384, kind="tiff", seed=seed)
    rng = np.random.default_rng(0)
    write_features(features_path(features_folder(out, "uni"), "with_features"),
                   rng.normal(size=(7, 12)).astype(np.float32), np.arange(14).reshape(7, 2) * 256)

    write_features(features_path(features_folder(out, "conch"), "other_encoder"),  # 5-dim: not the model's 12
                   rng.normal(size=(3, 5)).astype(np.float32), np.arange(6).reshape(3, 2) * 256)

    template = get_template("plain")
    texts = template.texts() + [Q1, Q2, " Melanoma.", " No, there is no necrosis."]
    tokenizer = train_chat_tokenizer(texts * 3, vocab_size=200)
    lm_config = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    arch = dict(image_dim=12, lm_config=lm_config, compressor="perceiver", num_image_tokens=3,
                resampler={"dim": 16, "depth": 1, "dim_head": 8, "heads": 2})
    torch.manual_seed(0)
    model = build_chat_model(**arch).eval()
    run.mkdir()
    save_chat_tokenizer(tokenizer, run)
    save_chat_model(chat_model_path(run), model, arch=arch, template="plain")
    return {"slides": slides, "out": out, "run": run}


def test_chat_endpoint_answers_as_the_assistant(site):
    features = features_path(features_folder(site["out"], "uni"), "with_features")
    expected = Assistant.load(site["run"]).ask(features, [Q1, Q2])
    assert all(isinstance(a, str) and a for a in expected)

    client = TestClient(create_app(site["out"], [site["slides"]], rate=0,
                                   chat=load_chat_backend(site["run"], site["out"], device="cpu")))
    assert client.get("/api/slides/with_features").json()["outputs"]["chat"] is True
    first = client.post("/api/slides/with_features/chat", json={"question": Q1})
    assert first.status_code == 200 and first.json() == {"answer": expected[0]}
    second = client.post("/api/slides/with_features/chat", json={
        "question": Q2, "history": [{"question": Q1, "answer": first.json()["answer"]}]})
    assert second.status_code == 200 and second.json() == {"answer": expected[1]}

    # the backend picks the named encoder's folder too
    named = load_chat_backend(site["run"], site["out"], encoder="uni", device="cpu")
    assert named("with_features", Q2, [(Q1, expected[0])]) == expected[1]


def test_slide_without_usable_features_is_a_clear_4xx(site):
    client = TestClient(create_app(site["out"], [site["slides"]], rate=0,
                                   chat=load_chat_backend(site["run"], site["out"], device="cpu")))
    missing = client.post("/api/slides/without_features/chat", json={"question": Q1})
    assert missing.status_code == 404
    detail = missing.json()["detail"]
    assert "without_features" in detail and "histoscope embed" in detail
    assert client.post("/api/slides/nosuch/chat", json={"question": Q1}).status_code == 404
    wrong = client.post("/api/slides/other_encoder/chat", json={"question": Q1})
    assert wrong.status_code == 422
    assert wrong.json()["detail"] == (
        "OUT/features_conch/other_encoder.h5 holds 5-dim features; the chat model reads 12-dim ones: embed the "
        "slide with its encoder (or pick that features folder: serve --chat-encoder)")


def test_report_panel_shows_what_histoscope_report_wrote(site, tmp_path):
    """`histoscope report FEATURES --out OUT/reports` with published-layout weights; the API (what the viewer's
    report panel shows) returns each slide's report as written, and none for a slide without one."""
    from typer.testing import CliRunner

    from histoscope.cli.main import app
    from histoscope.language import get_report_model_spec, load_report_model

    out = tmp_path / "out"
    features = features_path(features_folder(out, "ctranspath"), "with_features")
    rng = np.random.default_rng(1)
    write_features(features, rng.normal(size=(5, 16)).astype(np.float32), np.arange(10).reshape(5, 2) * 256)
    tokenizer = train_report_tokenizer(["Final diagnosis: melanoma, margins clear.",
                                        "Final diagnosis: naevus, margins involved."] * 5, vocab_size=80)
    tokenizer.save_pretrained(tmp_path / "biogpt_tokenizer")
    torch.manual_seed(0)
    lm_config, resampler_config = get_report_model_spec("histogpt").tiny  # 16-dim features in
    # published weights are read with the published head widths (64 in BioGPT, 96 in the resampler): one head each
    model = load_report_model("histogpt", lm_config={**lm_config, "vocab_size": len(tokenizer), "hidden_size": 64,
                                                     "num_attention_heads": 1},
                              resampler_config={**resampler_config, "dim_head": 96, "num_heads": 1})
    torch.save(model.official_state_dict(), tmp_path / "histogpt-tiny.pth")
    result = CliRunner().invoke(app, ["report", str(features), "--model", str(tmp_path / "histogpt-tiny.pth"),
                                      "--tokenizer", str(tmp_path / "biogpt_tokenizer"), "--out", str(out / "reports"),
                                      "--max-new-tokens", "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    import csv

    with open(out / "reports" / "reports.csv", newline="") as fh:
        written = {row["slide_id"]: row["report"] for row in csv.DictReader(fh)}
    assert list(written) == ["with_features"] and written["with_features"]
    assert (out / "reports" / "with_features.txt").read_text() == written["with_features"] + "\n"

    client = TestClient(create_app(out, [site["slides"]], rate=0))
    assert client.get("/api/slides/with_features").json()["outputs"]["report"] is True
    assert client.get("/api/slides/with_features/report").json() == {
        "source": "reports/with_features.txt", "report": written["with_features"]}
    assert client.get("/api/slides/without_features").json()["outputs"]["report"] is False
    assert client.get("/api/slides/without_features/report").status_code == 404
    (out / "reports" / "with_features.txt").unlink()  # the table alone is enough
    assert client.get("/api/slides/with_features/report").json() == {
        "source": "reports/reports.json", "report": written["with_features"]}
