"""``histoscope train-align`` and ``histoscope zeroshot`` on synthetic pair sets with known answers:
zero-shot accuracy far above chance, exact resumption, CoCa captioning, image and Hugging
Face towers, CONCH fine-tuning from the recipe, self-contained run folders, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import histoscope
from histoscope.cli.main import app
from histoscope.eval.zeroshot import zeroshot_eval
from histoscope.io.pairs import read_pair_image, read_pairs
from histoscope.language.align import TextTokenizer, load_align_model, load_align_run, train_bpe_tokenizer
from histoscope.language.align.data import PairInputs, embed_pairs
from histoscope.train.align import AlignConfig, load_align_recipe, train_align
from histoscope.train.align.synthetic import make_synthetic_pairs
from histoscope.train.config import ConfigError

RECIPES = Path(histoscope.__file__).parent / "train" / "align" / "recipes"  # shipped with the package
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_pairs(tmp_path_factory.mktemp("pairs"), per_class=60, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_synthetic_pairs(tmp_path_factory.mktemp("small"), per_class=12, seed=1)


def _config(data, out, **overrides) -> AlignConfig:
    settings = dict(pairs=str(data.csv), out_dir=str(out), model="clip", tiny=True, vocab_size=300, epochs=3,
                    lr=3e-3, weight_decay=0.01, batch_size=16, val_fraction=0.2, test_fraction=0.0,
                    device="cpu", precision="fp32", seed=0)
    return AlignConfig(**{**settings, **overrides})


def test_cli_train_align_then_zeroshot_beats_chance(synthetic, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-align", str(RECIPES / "align_tiny.yaml"), f"pairs={synthetic.csv}",
                                 "precision=fp32", "device=cpu", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert "model:" in result.output
    for name in ("config.yaml", "splits.csv", "model.pt", "history.json", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    assert not (run / "train_state.pt").exists()
    result = runner.invoke(app, ["zeroshot", str(run), "--prompts", str(synthetic.prompts)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "zeroshot_test" / "metrics.json").read_text())
    test_rows = sum(row["split"] == "test" for row in csv.DictReader(open(synthetic.csv)))
    assert metrics["n"] == test_rows > 40
    classification = metrics["classification"]
    print(f"zero-shot on {test_rows} held-out pairs: {classification['metrics']}, retrieval {metrics['retrieval']}")
    assert classification["chance"] == 0.25
    assert classification["metrics"]["accuracy"] >= 0.8
    assert classification["metrics"]["balanced_accuracy"] >= 0.8
    with open(run / "zeroshot_test" / "predictions.csv") as fh:
        predictions = list(csv.DictReader(fh))
    assert len(predictions) == test_rows
    assert np.mean([p["prediction"] == p["label"] for p in predictions]) == classification["metrics"]["accuracy"]
    assert set(metrics["retrieval"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    # the retrieved caption shares the image's class far more often than chance: R@10 over ~70 captions
    assert metrics["retrieval"]["image_to_text_R@10"] > 10 / test_rows


def test_an_untrained_model_is_at_chance(synthetic, tmp_path):
    """The same evaluation on the initial weights (epochs=0): the learning above is real."""
    train_align(_config(synthetic, tmp_path / "run", epochs=0, test_fraction=0.0))
    metrics = zeroshot_eval(tmp_path / "run", prompts=synthetic.prompts)
    assert metrics["classification"]["metrics"]["accuracy"] < 0.5


def test_a_killed_run_resumes_to_the_same_model(small, tmp_path):
    config = _config(small, tmp_path / "full", epochs=4)
    train_align(config)

    class Killed(Exception):
        pass

    def kill(epoch, record):
        if epoch == 1:
            raise Killed

    resumed = _config(small, tmp_path / "resumed", epochs=4)
    with pytest.raises(Killed):
        train_align(resumed, on_epoch_end=kill)
    assert (tmp_path / "resumed" / "train_state.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    messages = []
    result = train_align(resumed, log=messages.append)
    assert any("resuming after epoch 2" in m for m in messages)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    again = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert full["best_epoch"] == again["best_epoch"] == result["best_epoch"]
    for key, value in full["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    assert len(result["history"]) == 4
    # a finished run returns at once; another recipe into the same folder is refused
    assert train_align(resumed)["best_epoch"] == result["best_epoch"]
    with pytest.raises(ConfigError, match="differs in lr"):
        train_align(_config(small, tmp_path / "resumed", epochs=4, lr=1e-3))


def test_coca_captioning_loss_trains(small, tmp_path):
    config = _config(small, tmp_path / "coca", epochs=4, caption_weight=1.0, model_args={"decoder_layers": 1})
    result = train_align(config)
    captions = [r["train_caption"] for r in result["history"]]
    assert captions[-1] < captions[0] - 0.5
    assert all(r["train_loss"] == pytest.approx(r["train_clip"] + r["train_caption"], rel=1e-6) for r in result["history"])
    trained = load_align_run(tmp_path / "coca")
    assert trained.model.text_decoder is not None
    assert "val_caption" in result["history"][0]


def test_bf16_training_runs(small, tmp_path):
    result = train_align(_config(small, tmp_path / "bf16", epochs=2, precision="bf16"))
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in result["history"])


def test_images_through_a_tile_encoder_round_trip(tmp_path):
    data = make_synthetic_pairs(tmp_path / "images", per_class=6, kind="image", seed=2)
    model_args = {"image_encoder": "timm:vit_tiny_patch16_224", "image_weights": "random",
                  "image_arch": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "freeze_image": False}
    config = _config(data, tmp_path / "run", epochs=1, batch_size=8, model_args=model_args)
    train_align(config)
    trained = load_align_run(tmp_path / "run")
    assert trained.meta["arch"]["image_weights"] == "random"  # the encoder's weights are in model.pt
    pairs, _ = read_pairs(data.csv)
    inputs, problems = PairInputs(pairs[:5]).check()
    assert not problems and inputs.kind == "image"
    images, _ = embed_pairs(trained.model, inputs, trained.tokenizer([p.caption for p in inputs.pairs]),
                            batch_size=2, device=torch.device("cpu"))
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    encoder_weight = "visual.encoder.model.blocks.0.attn.qkv.weight"
    assert torch.equal(trained.model.state_dict()[encoder_weight], state[encoder_weight])
    x = trained.model.transform(np.stack([read_pair_image(p.path) for p in inputs.pairs]))
    with torch.no_grad():
        torch.testing.assert_close(trained.model.encode_image(x), images)


def test_hugging_face_text_towers(small, tmp_path):
    from transformers import BertConfig, BertModel

    bert = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64}
    config = _config(small, tmp_path / "from_config", epochs=1,
                     model_args={"text_model": "hf", "text_config": bert, "text_pooling": "mean"})
    train_align(config)
    trained = load_align_run(tmp_path / "from_config")
    assert trained.meta["arch"]["text_config"]["vocab_size"] == trained.tokenizer.vocab_size
    assert not trained.tokenizer.reserve_cls

    # a local model folder (weights and tokenizer), used once: the run folder is self-contained
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer([row["caption"] for row in csv.DictReader(open(small.csv))], vocab_size=300)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = tmp_path / "from_folder"
    train_align(_config(small, run, epochs=1, model_args={"text_model": "hf", "text_path": str(folder)}))
    before = load_align_run(run)
    shutil.rmtree(folder)
    after = load_align_run(run)
    assert after.meta["arch"]["text_path"] is None
    ids = after.tokenizer(["dense stroma.", "necrosis"])
    with torch.no_grad():
        torch.testing.assert_close(after.model.encode_text(ids), before.model.encode_text(ids))
    with pytest.raises(ConfigError, match="captioning decoder"):
        train_align(_config(small, tmp_path / "hf_coca", caption_weight=1.0,
                            model_args={"text_model": "hf", "text_config": bert}))


def test_conch_finetune_recipe_from_a_published_layout_checkpoint(small, tmp_path):
    data = make_synthetic_pairs(tmp_path / "images", per_class=3, kind="image", seed=3)
    captions = [row["caption"] for row in csv.DictReader(open(data.csv))]
    tokenizer = train_bpe_tokenizer(captions, vocab_size=300)
    tokenizer.backend_tokenizer.save(str(tmp_path / "conch_byte_level_bpe_uncased.json"))
    torch.manual_seed(0)
    published = load_align_model("conch", tiny=True, vocab_size=len(tokenizer))
    torch.save(published.state_dict(), tmp_path / "pytorch_model.bin")
    overrides = [f"pairs={data.csv}", f"weights={tmp_path / 'pytorch_model.bin'}", f"tokenizer={tmp_path}",
                 "tiny=true", "batch_size=4", "device=cpu", "precision=fp32", "val_fraction=0.25", "test_fraction=0"]
    # epochs=0: the published model as a run folder
    zero = load_align_recipe(RECIPES / "conch_finetune.yaml", [*overrides, "epochs=0", f"out_dir={tmp_path / 'zero'}"])
    train_align(zero)
    written = torch.load(tmp_path / "zero" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, written[k]) for k, v in published.state_dict().items())
    config = load_align_recipe(RECIPES / "conch_finetune.yaml", [*overrides, "epochs=1", f"out_dir={tmp_path / 'ft'}"])
    assert config.caption_weight == 2.0 and config.model == "conch"
    result = train_align(config)
    assert np.isfinite(result["history"][0]["train_caption"])
    metrics = zeroshot_eval(tmp_path / "ft", split="all")
    assert metrics["n"] == 12 and "accuracy" in metrics["classification"]["metrics"]


def test_bad_rows_are_reported_and_left_out(small, tmp_path):
    table = tmp_path / "pairs.csv"
    rows = list(csv.DictReader(open(small.csv)))
    for row in rows:
        row["features"] = str(small.csv.parent / row["features"])
    rows[0]["features"] = str(tmp_path / "missing.npy")
    rows[1]["caption"] = ""
    np.save(tmp_path / "wide.npy", np.zeros(7, np.float32))
    rows[2]["features"] = str(tmp_path / "wide.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    rows[3]["features"] = str(tmp_path / "broken.npy")
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    messages = []
    train_align(_config(small, tmp_path / "run", epochs=1, pairs=str(table)), log=messages.append)
    skipped = [m for m in messages if m.startswith("skipped")]
    assert len(skipped) == 4
    assert any("missing.npy: no such features file" in m for m in skipped)
    assert any("row 2: empty caption" in m for m in skipped)
    assert any("wide.npy: features are 7 wide" in m for m in skipped)
    assert any("broken.npy" in m for m in skipped)
    with open(tmp_path / "run" / "splits.csv") as fh:
        assert {int(r["row"]) for r in csv.DictReader(fh)}.isdisjoint({1, 2, 3, 4})


def test_every_align_recipe_loads():
    import yaml

    recipes = [p for p in sorted(RECIPES.glob("*.yaml")) if "pairs" in yaml.safe_load(p.read_text())]
    assert {p.name for p in recipes} >= {"align_tiny.yaml", "conch_finetune.yaml"}
    for path in recipes:
        assert load_align_recipe(path, ["pairs=pairs.csv"]).pairs == "pairs.csv"


def test_recipe_errors_are_one_line_and_name_the_fix(small, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'caption_weight'"):
        load_align_recipe(RECIPES / "align_tiny.yaml", ["captionweight=1"])
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        load_align_recipe(None, ["pairs=x.csv", "batch_size=1"])
    with pytest.raises(ConfigError, match="decoder_layers"):
        train_align(_config(small, tmp_path / "run", caption_weight=1.0))
    runner = CliRunner()
    result = runner.invoke(app, ["train-align", "pairs=/nonexistent.csv", "-o", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 2 and "/nonexistent.csv: no such pair table" in result.output
    result = runner.invoke(app, ["zeroshot", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no trained model here" in result.output
