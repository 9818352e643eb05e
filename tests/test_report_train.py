"""``histoscope train-report``, ``report`` and ``eval-reports`` on synthetic slides whose tile
features encode a diagnosis and a margin status: held-out reports name both, the image (not
the text prior) carries them, exact resumption, the published freezing, a local BioGPT
folder, bad input, and report metrics against hand-computed values."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import histoscope
from histoscope.cli.main import app
from histoscope.eval.report_metrics import bleu4, diagnosis_match, evaluate_reports, keyword_match, meteor, rouge_l
from histoscope.io.features_h5 import features_path, read_features, write_features
from histoscope.language.histogpt import IGNORE_INDEX
from histoscope.language.report_text import train_report_tokenizer
from histoscope.language.trained_report import load_report_run
from histoscope.train.config import ConfigError
from histoscope.train.report import load_report_recipe, train_report
from histoscope.train.report.data import assign_roles, draw_paraphrase, read_reports, token_batch
from histoscope.train.report.synthetic import DIAGNOSES, MARGINS, make_report_cohort

RECIPES = Path(histoscope.__file__).parent / "train" / "report" / "recipes"  # shipped with the package
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _findings(text: str) -> tuple[list[str], list[str]]:
    text = text.lower()
    return [d for d in DIAGNOSES if d in text], [m for m in MARGINS if m in text]


def _accuracy(reports: dict[str, str], truth: dict[str, tuple[str, str]]) -> tuple[float, float]:
    found = {s: _findings(t) for s, t in reports.items()}
    diagnosis = np.mean([found[s][0] == [truth[s][0]] for s in reports])
    margin = np.mean([found[s][1] == [truth[s][1]] for s in reports])
    return float(diagnosis), float(margin)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # stage 1's label names both findings: the frozen resampler carries what stage 1 taught it
    return make_report_cohort(tmp_path_factory.mktemp("reports"), slides=150, label="findings", seed=0)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """The tiny recipe trained through the CLI with its defaults; ``(run folder, held-out slide ids)``."""
    run = tmp_path_factory.mktemp("run") / "run"
    result = CliRunner().invoke(app, ["train-report", str(RECIPES / "histogpt_tiny.yaml"), f"reports={cohort.csv}",
                                      f"features_dir={cohort.features_dir}", f"out={run}", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    held_out = [r["slide_id"] for r in _read_csv(run / "splits.csv") if r["split"] == "test"]
    return run, held_out


def test_held_out_reports_name_the_diagnosis_and_margins_from_the_image(cohort, trained, tmp_path):
    run, held_out = trained
    assert len(held_out) >= 25 and (run / "model.pt").is_file() and (run / "tokenizer").is_dir()
    assert (run / "stage1" / "run" / "fold_0" / "checkpoint.pt").is_file()  # stage 1 ran: the table has labels
    history = json.loads((run / "history.json").read_text())
    assert all(np.isfinite(e["val_loss"]) for e in history["epochs"])

    out = tmp_path / "reports"
    files = [str(features_path(cohort.features_dir, s)) for s in held_out]
    result = CliRunner().invoke(app, ["report", *files, "--model", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "reports.csv")
    reports = {r["slide_id"]: r["report"] for r in rows}
    assert sorted(reports) == sorted(held_out)
    for slide_id, text in reports.items():  # one text file per slide, the same report
        assert (out / f"{slide_id}.txt").read_text().strip() == text
    assert json.loads((out / "reports.json").read_text())["prompt"] == "Final diagnosis:"
    diagnosis, margin = _accuracy(reports, cohort.truth)
    assert diagnosis >= 0.90 and margin >= 0.85, (diagnosis, margin)

    # the same slides with every feature zeroed: the text prior alone cannot say which finding
    zeroed = tmp_path / "zeroed"
    for slide_id in held_out:
        features, coords, _ = read_features(features_path(cohort.features_dir, slide_id))
        write_features(features_path(zeroed, slide_id), np.zeros_like(features), coords)
    result = CliRunner().invoke(app, ["report", str(zeroed), "--model", str(run), "--out", str(tmp_path / "z")])
    assert result.exit_code == 0, result.output
    blind = {r["slide_id"]: r["report"] for r in _read_csv(tmp_path / "z" / "reports.csv")}
    blind_diagnosis, blind_margin = _accuracy(blind, cohort.truth)
    assert blind_diagnosis <= diagnosis - 0.4 and blind_margin <= margin - 0.2, (blind_diagnosis, blind_margin)


def test_batching_beams_sampling_and_a_bad_slide(cohort, trained, tmp_path):
    run, held_out = trained
    good = [features_path(cohort.features_dir, s) for s in held_out[:4]]
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an hdf5 file")
    with h5py.File(tmp_path / "other_dim.h5", "w") as f:
        f["features"], f["coords"] = np.zeros((3, 5), np.float32), np.zeros((3, 2), np.int64)
    table = tmp_path / "slides.csv"
    table.write_text("slide_id,features\n" + "".join(f"{p.stem},{p}\n" for p in good)
                     + f"missing,{tmp_path / 'missing.h5'}\nbroken,{broken}\nother,other_dim.h5\n")
    runner = CliRunner()
    one = runner.invoke(app, ["report", str(table), "--model", str(run), "--out", str(tmp_path / "one"),
                              "--batch-size", "1"])
    assert one.exit_code == 1  # some slides failed, the others were written
    assert "FAILED missing" in one.output and "FAILED broken" in one.output and "FAILED other" in one.output
    batched = runner.invoke(app, ["report", str(table), "--model", str(run / "model.pt"), "--out",
                                  str(tmp_path / "batched"), "--batch-size", "8"])
    assert batched.exit_code == 1
    first = _read_csv(tmp_path / "one" / "reports.csv")
    assert first == _read_csv(tmp_path / "batched" / "reports.csv") and len(first) == 4  # padding changes nothing
    failed = json.loads((tmp_path / "one" / "reports.json").read_text())["failed"]
    assert sorted(failed) == ["broken", "missing", "other"] and "5-dim" in failed["other"] or "5)" in failed["other"]

    beams = runner.invoke(app, ["report", *map(str, good), "--model", str(run), "--out", str(tmp_path / "beam"),
                                "--num-beams", "3"])
    assert beams.exit_code == 0, beams.output
    sampled = [runner.invoke(app, ["report", *map(str, good), "--model", str(run), "--out", str(tmp_path / f"s{i}"),
                                   "--sample", "--top-k", "5", "--seed", "3"]) for i in range(2)]
    assert all(r.exit_code == 0 for r in sampled)
    assert _read_csv(tmp_path / "s0" / "reports.csv") == _read_csv(tmp_path / "s1" / "reports.csv")


def _small_config(cohort, out, *extra):
    return load_report_recipe(RECIPES / "histogpt_tiny.yaml", [
        f"reports={cohort.csv}", f"features_dir={cohort.features_dir}", f"out={out}", "device=cpu", *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_report_cohort(tmp_path_factory.mktemp("small"), slides=24, seed=1)


def test_a_killed_run_resumes_to_the_same_model(small, tmp_path):
    settings = ("epochs=3", "stage1.enabled=false", "batch_size=8")
    uninterrupted = train_report(_small_config(small, tmp_path / "full", *settings))
    config = _small_config(small, tmp_path / "resumed", *settings)

    def stop_after_second_epoch(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt  # what a Ctrl-C or SIGTERM raises in the training loop

    with pytest.raises(KeyboardInterrupt):
        train_report(config, on_epoch_end=stop_after_second_epoch)
    run = tmp_path / "resumed"
    assert sorted(p.name for p in run.glob("*.pt")) == ["train_state.pt"]
    lines: list[str] = []
    resumed = train_report(config, log=lines.append)
    assert "stage 2: resuming after epoch 2" in lines
    assert [e["train_loss"] for e in resumed["history"]] == [e["train_loss"] for e in uninterrupted["history"]]
    expected = torch.load(uninterrupted["model"], weights_only=True)["state_dict"]
    got = torch.load(resumed["model"], weights_only=True)["state_dict"]
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert train_report(config)["best_epoch"] == resumed["best_epoch"]  # finished: returns at once
    with pytest.raises(ConfigError, match="differs in lr"):
        train_report(_small_config(small, run, *settings, "lr=0.1"))


def test_local_biogpt_folder_and_the_published_freezing(small, tmp_path):
    """lm_path: BioGPT's weights and tokenizer from a folder; by default stage 2 trains the
    cross-attention blocks and exit gate only: BioGPT and the stage-1 resampler are kept."""
    from transformers import BioGptConfig, BioGptForCausalLM

    folder = tmp_path / "biogpt"
    texts = [row["report"] for row in _read_csv(small.csv)]
    tokenizer = train_report_tokenizer(["Final diagnosis:", *texts], vocab_size=200)
    torch.manual_seed(0)
    biogpt = BioGptForCausalLM(BioGptConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=80))
    biogpt.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = load_report_recipe(RECIPES / "histogpt_1b.yaml", [
        f"reports={small.csv}", f"features_dir={small.features_dir}", f"out={tmp_path / 'run'}", f"lm_path={folder}",
        "device=cpu", "precision=fp32", "epochs=1", "batch_size=8", "stage1.epochs=1", "stage1.batch_size=8",
        "resampler_config={dim_model: 16, dim_head: 8, num_heads: 2, num_layers: 1, num_latents: 4}"])
    train_report(config)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    reference = biogpt.state_dict()
    for key in ("biogpt.embed_tokens.weight", "biogpt.layers.1.fc1.weight", "biogpt.layer_norm.bias"):
        ours = "lm." + key.replace("layers.1.", "layers.1.1.")
        assert torch.equal(state[ours], reference[key]), key
    stage1 = torch.load(tmp_path / "run" / "stage1" / "run" / "fold_0" / "checkpoint.pt", weights_only=True)
    for key, value in stage1["state_dict"].items():
        if key.startswith("resampler."):
            assert torch.equal(state[key], value), key
    gates = [v for k, v in state.items() if k.endswith(("attn_gate", "ff_gate"))]
    assert gates and any(bool(g.abs().sum() > 0) for g in gates)  # the blocks trained (gates start at 0)
    run = load_report_run(tmp_path / "run")
    assert len(run.tokenizer) == len(tokenizer) and run.model.config.hidden_size == 32


def test_bf16_autocast_trains(small, tmp_path):
    result = train_report(_small_config(small, tmp_path / "bf16", "epochs=1", "stage1.enabled=false",
                                        "precision=bf16", "batch_size=8"))
    assert np.isfinite(result["history"][0]["train_loss"]) and np.isfinite(result["history"][0]["val_loss"])


def test_loss_targets_are_the_report_tokens_only():
    ids, mask, labels = token_batch([2, 7, 8], [[20, 21, 2], [30, 31, 32, 33, 2]], pad_token_id=1,
                                    max_report_tokens=4)
    assert ids.tolist() == [[2, 7, 8, 20, 21, 2, 1], [2, 7, 8, 30, 31, 32, 2]]  # cut to 4, the end token kept
    assert mask.tolist() == [[1] * 6 + [0], [1] * 7]
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, 20, 21, 2, x], [x, x, x, 30, 31, 32, 2]]


def test_paraphrases_and_patient_level_splits(tmp_path):
    table = tmp_path / "reports.csv"
    table.write_text("slide_id,report,patient_id\na,first,p1\na,second,p1\nb,only,p1\n"
                     + "".join(f"s{i},text {i},q{i // 2}\n" for i in range(40)))
    slides = read_reports(table)
    assert slides[0].reports == ("first", "second") and slides[1].reports == ("only",)
    drawn = {draw_paraphrase(slides[0], seed=0, epoch=e, index=0) for e in range(20)}
    assert drawn == {"first", "second"}
    roles = assign_roles(slides, val_fraction=0.2, test_fraction=0.25, seed=0)
    by_patient: dict[str, set] = {}
    for slide, role in zip(slides, roles):
        by_patient.setdefault(slide.patient_id, set()).add(role)
    assert all(len(r) == 1 for r in by_patient.values())
    assert {"train", "val", "test"} == set(roles)
    assert roles == assign_roles(slides, val_fraction=0.2, test_fraction=0.25, seed=0)  # seeded
    (tmp_path / "split.csv").write_text("slide_id,report,split\na,x,train\nb,y,test\nc,z,val\n")
    assert assign_roles(read_reports(tmp_path / "split.csv"), val_fraction=0.5, test_fraction=0.5, seed=0) == \
        ["train", "test", "val"]
    (tmp_path / "fold.csv").write_text("slide_id,report,fold\na,x,0\nb,y,1\nc,z,1\n")
    assert assign_roles(read_reports(tmp_path / "fold.csv"), val_fraction=0, test_fraction=0, seed=0,
                        test_fold="1") == ["train", "test", "test"]
    (tmp_path / "bad.csv").write_text("slide_id,report,label\na,x,one\na,y,two\n")
    with pytest.raises(ValueError, match="bad.csv:3: slide 'a' has label"):
        read_reports(tmp_path / "bad.csv")


def test_recipes_load_and_bad_input_is_one_line(cohort, tmp_path):
    tiny = load_report_recipe(RECIPES / "histogpt_tiny.yaml", ["csv=r.csv", "features_dir=f", "out=o"])
    assert (tiny.reports, tiny.out_dir, tiny.train_lm) == ("r.csv", "o", True)
    published = load_report_recipe(RECIPES / "histogpt_1b.yaml", ["reports=r.csv", "features_dir=f"])
    assert (published.train_lm, published.train_resampler, published.prompt) == (False, False, "Final diagnosis:")
    with pytest.raises(ConfigError, match="unknown recipe key 'epoch'"):
        load_report_recipe(RECIPES / "histogpt_tiny.yaml", ["reports=r.csv", "features_dir=f", "epoch=3"])
    runner = CliRunner()
    result = runner.invoke(app, ["train-report", str(RECIPES / "histogpt_tiny.yaml"), f"reports={cohort.csv}",
                                 f"features_dir={tmp_path}", f"out={tmp_path / 'run'}", "-q"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "150 of 150 slides have no features file" in result.output
    result = runner.invoke(app, ["report", str(tmp_path), "--model", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2 and "error:" in result.output


class _NoSynonyms:
    """A WordNet with no synsets: METEOR's exact and stem stages only (hand-computable)."""

    def synsets(self, *args, **kwargs):
        return []


def test_report_metrics_match_hand_computed_values(tmp_path):
    # BLEU-4: n-gram precisions 5/6, 3/5, 2/4, 1/3 and no brevity penalty → (1/12)^(1/4)
    assert bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # ROUGE-L: longest common subsequence 5 of 6 words each way
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(5 / 6)
    # METEOR: 5 matches, P = 1, R = 5/6, F = PR / (0.9 P + 0.1 R); 3 chunks → penalty 0.5 (3/5)^3
    f_mean = (5 / 6) / (0.9 + 0.1 * 5 / 6)
    assert meteor(["basal cell carcinoma margins free"], [["basal cell carcinoma with free margins"]],
                  wordnet=_NoSynonyms()) == pytest.approx(f_mean * (1 - 0.5 * 0.6**3))
    hyps = ["Basal cell carcinoma, margins free.", "Melanocytic nevus; margins involved."]
    refs = [["Basal cell carcinoma. Margins are free."], ["Squamous cell carcinoma, margins free."]]
    keywords = ["basal cell carcinoma", "squamous cell carcinoma", "melanocytic nevus", "free", "involved"]
    # slide 1: {bcc, free} both said; slide 2: truth {scc, free}, said {nevus, involved}
    assert keyword_match(hyps, refs, keywords) == pytest.approx(
        {"keyword_precision": 2 / 4, "keyword_recall": 2 / 4, "keyword_f1": 0.5, "keyword_exact": 0.5})
    assert diagnosis_match(hyps, ["basal cell carcinoma", "squamous cell carcinoma"]) == 0.5

    (tmp_path / "refs.csv").write_text("slide_id,report,label\na,Basal cell carcinoma. Margins are free.,basal cell "
                                       "carcinoma\nb,\"Squamous cell carcinoma, margins free.\",squamous cell carcinoma\n"
                                       "c,Melanocytic nevus.,melanocytic nevus\n")
    (tmp_path / "gen.csv").write_text("slide_id,report\na,\"Basal cell carcinoma, margins free.\"\n"
                                      "b,Melanocytic nevus; margins involved.\n")
    result = evaluate_reports(tmp_path / "refs.csv", tmp_path / "gen.csv", keywords=keywords, wordnet=_NoSynonyms())
    assert result["n"] == 2 and result["missing"] == ["c"] and result["diagnosis_match"] == 0.5
    assert result["bleu4"] == pytest.approx(bleu4(hyps, refs)) and result["keyword_f1"] == pytest.approx(0.5)
    cli = CliRunner().invoke(app, ["eval-reports", str(tmp_path / "refs.csv"), str(tmp_path / "gen.csv"),
                                   "--keywords", ",".join(keywords), "--out", str(tmp_path / "m.json")])
    assert cli.exit_code == 0, cli.output
    assert "rouge_l" in cli.output and json.loads((tmp_path / "m.json").read_text())["n"] == 2
    if json.loads((tmp_path / "m.json").read_text())["meteor"] is None:  # no WordNet data here: said, not downloaded
        assert "METEOR not computed" in cli.output


def test_report_from_published_weights_with_a_local_tokenizer(small, tmp_path):
    """A checkpoint in the authors' key layout (sizes read off it) plus a tokenizer folder."""
    from histoscope.language import load_report_model

    tokenizer = train_report_tokenizer([row["report"] for row in _read_csv(small.csv)], vocab_size=150)
    tokenizer.save_pretrained(tmp_path / "biogpt_tokenizer")
    torch.manual_seed(0)
    model = load_report_model("histogpt", lm_config={
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
        "intermediate_size": 64, "max_position_embeddings": 40}, resampler_config={
        "dim_feats": 16, "dim_model": 32, "dim_head": 96, "num_heads": 1, "num_layers": 1, "num_latents": 4})
    torch.save(model.official_state_dict(), tmp_path / "histogpt-tiny.pth")
    files = [str(p) for p in sorted(small.features_dir.glob("*.h5"))[:3]]
    runner = CliRunner()
    result = runner.invoke(app, ["report", *files, "--model", str(tmp_path / "histogpt-tiny.pth"), "--tokenizer",
                                 str(tmp_path / "biogpt_tokenizer"), "--out", str(tmp_path / "out"), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert len(_read_csv(tmp_path / "out" / "reports.csv")) == 3
    result = runner.invoke(app, ["report", *files, "--model", str(tmp_path / "histogpt-tiny.pth"), "--out",
                                 str(tmp_path / "out2")])
    assert result.exit_code == 2 and "pass --tokenizer" in result.output


def test_word_heatmaps_are_attention_over_the_tiles(cohort, trained, tmp_path):
    run, held_out = trained
    files = [str(features_path(cohort.features_dir, s)) for s in held_out[:2]]
    result = CliRunner().invoke(app, ["report", *files, "--model", str(run), "--out", str(tmp_path), "--heatmaps"])
    assert result.exit_code == 0, result.output
    for row in _read_csv(tmp_path / "reports.csv"):
        words = sorted((tmp_path / row["slide_id"] / "words").glob("*.csv"))
        assert len(words) == len(row["report"].split())  # one map per word
        assert len(list((tmp_path / row["slide_id"] / "words").glob("*.geojson"))) == len(words)
        tiles = len(read_features(features_path(cohort.features_dir, row["slide_id"]))[0])
        for path in words:
            scores = np.array([float(r["score"]) for r in _read_csv(path)])
            assert len(scores) == tiles and (scores >= 0).all() and scores.sum() <= 1 + 1e-6


def test_token_tile_attention_known_answer():
    """Queries of zero attend uniformly to the latents: every token's attention over the
    tiles is then the resampler's last-layer latent→tile attention, averaged."""
    from histoscope.language import load_report_model
    from histoscope.language.report_attention import token_tile_attention

    torch.manual_seed(0)
    model = load_report_model("histogpt_test").eval()
    with torch.no_grad():
        for layer in model.fusion_layers:
            layer.block.attn.to_q.weight.zero_()
    features = torch.randn(1, 9, 16)
    _, attention = model.resampler(features, return_attention=True)  # (1, h, L, N + L)
    expected = attention[0, :, :, :9].mean((0, 1))  # (N,)
    got = token_tile_attention(model, torch.tensor([[2, 5, 6, 7]]), features)
    assert got.shape == (4, 9)
    torch.testing.assert_close(got, expected.expand(4, -1), rtol=0, atol=1e-6)
