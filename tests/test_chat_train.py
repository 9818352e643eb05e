"""``histoscope train-chat`` and ``histoscope chat`` on synthetic slides with known answers:
the two-turn conversation answered from the image (and not without it), batched and
cached answers equal to solo and re-encoded ones, stage 1 leaving the LM alone, LoRA
from a local LM folder, exact resumption, tile images, slides, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import histoscope
import torch
from typer.testing import CliRunner

from histoscope.cli.main import app
from histoscope.language.chat import Assistant
from histoscope.train.chat import load_chat_recipe, train_chat
from histoscope.train.chat.synthetic import QUESTIONS, make_synthetic_chat, zero_features
from histoscope.train.config import ConfigError

RECIPES = Path(histoscope.__file__).parent / "train" / "chat" / "recipes"  # shipped with the package
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_chat(tmp_path_factory.mktemp("chat"), train_slides=240, heldout_slides=40, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_synthetic_chat(tmp_path_factory.mktemp("small"), train_slides=24, heldout_slides=2, seed=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny recipe with its defaults, through the command line."""
    run = tmp_path_factory.mktemp("run") / "chat"
    result = CliRunner().invoke(app, ["train-chat", str(RECIPES / "chat_tiny.yaml"), f"conversations={data.conversations}",
                                      f"features_dir={data.features_dir}", f"out={run}", "device=cpu", "-q"])
    assert result.exit_code == 0, result.output
    return run


def _small_config(small, out, *overrides):
    return load_chat_recipe(RECIPES / "chat_tiny.yaml", [
        f"conversations={small.conversations}", f"features_dir={small.features_dir}", f"out={out}", "device=cpu",
        "stage1.epochs=1", "stage2.epochs=2", "model.lm_config.hidden_size=32", "model.lm_config.intermediate_size=32",
        "model.lm_config.num_hidden_layers=1", "vocab_size=260", *overrides])


def _ask_cli(run, folder):
    result = CliRunner().invoke(app, ["chat", "--model", str(run), "--features", str(folder),
                                      "--question", QUESTIONS[0], "--question", QUESTIONS[1], "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _scores(data, answers):
    diagnosis = np.mean([data.diagnosis[a["slide_id"]] in a["turns"][0]["answer"].lower() for a in answers])
    finding = np.mean([a["turns"][1]["answer"].startswith(("Yes", "No")[data.finding[a["slide_id"]]])
                       for a in answers])
    return diagnosis, finding


def test_two_turn_conversation_answered_from_the_image(trained, data, tmp_path):
    for name in ("config.yaml", "splits.csv", "tokenizer/tokenizer.json", "stage1.pt", "model.pt", "history.json"):
        assert (trained / name).exists(), name
    assert not list(trained.glob("stage*_state.pt"))
    history = json.loads((trained / "history.json").read_text())
    assert {r["stage"] for r in history} == {1, 2} and all("val_loss" in r for r in history)
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    for slide in data.heldout:
        shutil.copy(data.features_dir / f"{slide}.h5", heldout / f"{slide}.h5")
    answers = _ask_cli(trained, heldout)
    assert [a["slide_id"] for a in answers] == sorted(data.heldout)
    assert all([t["question"] for t in a["turns"]] == list(QUESTIONS) for a in answers)
    diagnosis, finding = _scores(data, answers)
    blind_diagnosis, blind_finding = _scores(data, _ask_cli(trained, zero_features(data.features_dir, tmp_path / "zero",
                                                                                   data.heldout)))
    print(f"held-out: diagnosis {diagnosis:.2f}, finding {finding:.2f}; features zeroed: "
          f"{blind_diagnosis:.2f}, {blind_finding:.2f}")
    assert diagnosis >= 0.9 and finding >= 0.85
    assert blind_diagnosis <= 0.5 and blind_finding <= 0.7  # chance: 0.25 and 0.5


def test_batched_and_cached_answers_equal_solo_and_reencoded_ones(trained, data):
    assistant = Assistant.load(trained)
    slides = [data.features_dir / f"{s}.h5" for s in data.heldout[:6]]
    batched = assistant.ask_batch(slides + [None], list(QUESTIONS))  # answers of different lengths, a text-only row
    assert batched[:6] == [assistant.ask(slide, list(QUESTIONS)) for slide in slides]
    reencoded = assistant.conversation(slides, keep_cache=False)
    assert [reencoded.ask(q) for q in QUESTIONS] == [list(turn) for turn in zip(*batched[:6])]
    # the single-slide command prints one answer per question
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "-f", str(slides[0]), "-q", QUESTIONS[0],
                                      "-q", QUESTIONS[1]])
    assert result.exit_code == 0 and result.stdout.splitlines() == batched[0]
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "-f", str(slides[0]), "-q", QUESTIONS[0], "--json"])
    assert json.loads(result.stdout) == [{"question": QUESTIONS[0], "answer": batched[0][0]}]


def test_interactive_chat_and_a_bad_file_in_a_batch(trained, data, tmp_path):
    slide = data.features_dir / f"{data.heldout[0]}.h5"
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "-f", str(slide)],
                                input=f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("assistant> ") == 2
    assert Assistant.load(trained).ask(slide, list(QUESTIONS)) == [
        line.split("assistant> ")[1] for line in result.stdout.splitlines() if "assistant> " in line]
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "-f", str(slide), "-f", str(broken),
                                      "-q", QUESTIONS[0], "--json"])
    assert result.exit_code == 1
    assert [a["slide_id"] for a in json.loads(result.stdout)] == [data.heldout[0]]
    assert "FAILED broken" in result.stderr
    table = tmp_path / "slides.csv"  # a CSV of features files: its slide ids name the conversations
    table.write_text(f"slide_id,features\ncase_a,{slide}\ncase_b,{data.features_dir / (data.heldout[1] + '.h5')}\n")
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "-f", str(table), "-q", QUESTIONS[1], "--json"])
    assert result.exit_code == 0, result.output
    assert [a["slide_id"] for a in json.loads(result.stdout)] == ["case_a", "case_b"]
    for args, message in ((["-f", str(slide), "--image", str(broken)], "exactly one of"),
                          (["--slide", str(broken)], "--slide needs --encoder"),
                          (["-f", str(tmp_path / "none.h5"), "-q", "Q"], "none.h5")):
        result = CliRunner().invoke(app, ["chat", "-m", str(trained), *args])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_about_a_slide_tiled_and_embedded_first(trained, tmp_path):
    from histoscope.io.sample import make_sample_slide

    slide = make_sample_slide(tmp_path / "s.svs", width=2048, height=1536, mpp=0.5, kind="svs", seed=3).path
    # a 16-dim encoder, as the synthetic features the assistant learnt from
    result = CliRunner().invoke(app, ["chat", "-m", str(trained), "--slide", str(slide), "--encoder", "uni",
                                      "--weights", "random", "--arch", "depth=1", "--arch", "embed_dim=16",
                                      "--arch", "num_heads=2", "-q", QUESTIONS[0], "--json"])
    assert result.exit_code == 0, result.output
    (turn,) = json.loads(result.stdout)
    assert turn["question"] == QUESTIONS[0] and turn["answer"]


def test_stage_one_leaves_the_lm_alone_then_lora_from_a_local_lm_folder(small, tmp_path):
    from peft import PeftModel

    from histoscope.language.chat import load_chat_model
    from histoscope.language.chat.model import build_causal_lm

    # a "published" LM folder: a tiny Llama with its tokenizer, as a Llama-2 snapshot holds them
    first = _small_config(small, tmp_path / "scratch", "stage2.epochs=0")
    train_chat(first)
    lm_dir = tmp_path / "llama"
    load_chat_model(tmp_path / "scratch" / "model.pt")[0].lm.save_pretrained(str(lm_dir))
    shutil.copytree(tmp_path / "scratch" / "tokenizer", lm_dir, dirs_exist_ok=True)

    config = _small_config(small, tmp_path / "lora", f"model.lm_path={lm_dir}", "stage2.lm=lora",
                           "lora.targets=[q_proj,v_proj]", "lora.r=4")
    seen = {}

    def on_stage_start(stage, model):
        seen[stage] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    train_chat(config, on_stage_start=on_stage_start)
    lm_keys = [k for k in seen[1] if k.startswith("lm.")]
    assert lm_keys and all(torch.equal(seen[1][k], seen[2][k]) for k in lm_keys)  # stage 1: every LM weight unchanged
    assert not torch.equal(seen[1]["projector.0.weight"], seen[2]["projector.0.weight"])
    run = tmp_path / "lora"
    assert (run / "adapter" / "adapter_config.json").exists()
    stored = torch.load(run / "model.pt", weights_only=True)
    assert not any(k.startswith("lm.") for k in stored["state_dict"]) and stored["lora"] is not None
    merged = Assistant.load(run).model
    base = build_causal_lm(lm_path=lm_dir).eval()
    ids = torch.randint(4, 200, (2, 10))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        torch.testing.assert_close(merged.lm(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)
        assert (merged.lm(input_ids=ids).logits - before).abs().max() > 1e-3  # the adapters changed the LM


def test_a_killed_run_resumes_to_the_same_model(small, tmp_path):
    whole = _small_config(small, tmp_path / "whole")
    train_chat(whole)

    class Killed(Exception):
        pass

    def kill(stage, epoch, **_):
        if stage == 2 and epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        train_chat(_small_config(small, tmp_path / "killed"), on_epoch_end=kill)
    assert (tmp_path / "killed" / "stage2_state.pt").exists() and (tmp_path / "killed" / "stage1.pt").exists()
    train_chat(_small_config(small, tmp_path / "killed"))
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "whole" / "history.json").read_text())[-1]["val_loss"] == pytest.approx(
        json.loads((tmp_path / "killed" / "history.json").read_text())[-1]["val_loss"])


def test_tile_images_through_the_tile_encoder_and_bf16(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        red = i % 2 == 0
        pixels = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
        pixels[..., 0 if red else 2] += 180
        Image.fromarray(pixels).save(tmp_path / f"tile_{i}.png")
        items.append({"id": f"t{i}", "image": f"tile_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich colour dominates?"},
            {"from": "gpt", "value": "Red." if red else "Blue."}]})
    (tmp_path / "conv.json").write_text(json.dumps(items))
    config = load_chat_recipe(RECIPES / "chat_tiny.yaml", [
        f"conversations={tmp_path / 'conv.json'}", f"images_dir={tmp_path}", f"out={tmp_path / 'run'}", "device=cpu",
        "precision=bf16", "model.encoder=uni", "model.encoder_weights=random",
        "model.encoder_arch={depth: 1, embed_dim: 16, num_heads: 2}", "model.compressor=attention_pool",
        "model.num_image_tokens=2", "stage1.epochs=1", "stage2.epochs=1", "vocab_size=260",
        "model.lm_config.num_hidden_layers=1"])
    result = train_chat(config)
    assert all(np.isfinite(r["train_loss"]) for r in result["history"])
    result = CliRunner().invoke(app, ["chat", "-m", str(tmp_path / "run"), "--image", str(tmp_path / "tile_0.png"),
                                      "-q", "Which colour dominates?", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["question"] == "Which colour dominates?"


def test_recipe_errors_are_one_line_and_name_the_fix(small, tmp_path):
    runner = CliRunner()
    base = [str(RECIPES / "chat_tiny.yaml"), f"conversations={small.conversations}",
            f"features_dir={small.features_dir}", f"out={tmp_path / 'run'}"]
    for extra, message in ((["stage1.lm=full"], "stage1.lm must be frozen"),
                           (["stage2.lm=half"], "stage2.lm must be one of"),
                           (["model.projektor=linear"], "did you mean 'model.projector'"),
                           ([f"conversations={tmp_path / 'none.json'}"], "none.json")):
        result = runner.invoke(app, ["train-chat", *base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="model_type"):
        load_chat_recipe(None, ["conversations=c.json"])


def test_every_chat_recipe_loads():
    tiny = load_chat_recipe(RECIPES / "chat_tiny.yaml", ["conversations=c.json"])
    assert tiny.stage1.lm == "frozen" and tiny.stage2.lm == "full" and tiny.model.lm_path is None
    llama = load_chat_recipe(RECIPES / "pathchat_llama.yaml", ["conversations=c.json", "model.lm_path=llama"])
    assert llama.stage2.lm == "lora" and llama.model.encoder == "uni" and llama.model.projector == "mlp2x_gelu"
