"""Fine-tuning from a checkpoint: the shipped ``gigapath_finetune`` recipe run on a synthetic
cohort from a Prov-GigaPath slide encoder written in the official key layout, with the
optimizer's layer-decayed learning rates checked against Prov-GigaPath's own rule
(``finetune/utils.py``: ``param_groups_lrd`` and ``get_layer_id``) and the encoder left
bit-identical when it is frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import histoscope
from histoscope.cli.main import app
from histoscope.slide import SlideWeightsError, get_slide_model_spec, load_slide_model
from histoscope.slide.trained import load_trained_model
from histoscope.train import ConfigError, load_recipe, train
from histoscope.train.synthetic import make_mil_cohort

RECIPE = Path(histoscope.__file__).parent / "train" / "recipes" / "gigapath_finetune.yaml"
DIM = 32
HEAD = get_slide_model_spec("gigapath_slide").is_head
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_mil_cohort(tmp_path_factory.mktemp("cohort"), slides=12, tiles=(20, 40), dim=DIM, seed=7)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A tiny slide encoder saved as ``slide_encoder.pth`` is published: ``{"model": state_dict}``, no head."""
    torch.manual_seed(123)
    encoder = load_slide_model("gigapath_slide", in_dim=DIM, num_outputs=0, tiny=True)
    path = tmp_path_factory.mktemp("published") / "slide_encoder.pth"
    torch.save({"model": encoder.state_dict()}, path)
    return path


def _recipe(cohort, published, out: Path, *overrides: str):
    return load_recipe(RECIPE, [f"csv={cohort.csv}", f"features_dir={cohort.features_dir}", f"out_dir={out}",
                                f"init_weights={published}", "tiny=true", "model_args.feat_layers=[1]", "folds=2",
                                "epochs=2", "accumulate=2", "device=cpu", "precision=fp32", "bootstrap=10",
                                *overrides])


def _reference_lrs(model, *, lr: float, weight_decay: float, layer_decay: float) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every parameter by Prov-GigaPath's rule, applied to the names the
    parameters have in its ``ClassificationHead`` (``slide_encoder.*``, head ``classifier.0.*``)."""
    num_layers = len(model.encoder.layers) + 1  # model.slide_encoder.encoder.num_layers + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    def get_layer_id(name: str) -> int:
        if "cls_token" in name or "pos_embed" in name:
            return 0
        elif name.startswith("patch_embed"):
            return 0
        elif name.startswith("slide_encoder.encoder.layers"):
            return int(name.split(".")[3]) + 1
        return num_layers

    expected = {}
    for name, parameter in model.named_parameters():
        official = "classifier.0." + name.removeprefix("head.") if HEAD(name) else "slide_encoder." + name
        this_decay = 0.0 if parameter.ndim == 1 else weight_decay
        expected[name] = (lr * layer_scales[get_layer_id(official)], this_decay)
    return expected


def _watch(out: Path, seen: list):
    """``on_epoch_end`` hook keeping what each epoch's resumable state holds."""

    def hook(*, fold, epoch, record):
        state = torch.load(out / f"fold_{fold}" / "train_state.pt", weights_only=True)
        seen.append({"fold": fold, "epoch": epoch, "groups": state["optimizer"]["param_groups"],
                     "model": state["model"], "loss": record["train_loss"]})

    return hook


def test_finetune_recipe_trains_with_prov_gigapath_layer_decay(cohort, published, tmp_path):
    config = _recipe(cohort, published, tmp_path)
    assert (config.model, config.new_head, config.freeze_encoder, config.layer_decay) == \
        ("gigapath_slide", True, False, 0.95)
    seen = []
    results = train(config, on_epoch_end=_watch(tmp_path, seen))
    assert results["pooled"]["n"] == 12 and len(seen) == 4

    trained = load_trained_model(tmp_path / "fold_0" / "checkpoint.pt")
    expected = _reference_lrs(trained.model, lr=config.lr, weight_decay=config.weight_decay, layer_decay=0.95)
    assert sorted({round(lr / config.lr, 12) for lr, _ in expected.values()}) == \
        [round(0.95 ** k, 12) for k in (3, 2, 1, 0)]  # cls token, layer 0, layer 1, the rest
    for epoch in seen:
        groups = epoch["groups"]
        names = [name for group in groups for name in group["param_names"]]
        assert sorted(names) == sorted(expected)  # every parameter trains, once
        progress = {group["lr"] / group["initial_lr"] for group in groups}
        assert max(progress) - min(progress) < 1e-12  # one schedule, scaled per layer
        for group in groups:
            for name in group["param_names"]:
                assert group["initial_lr"] == pytest.approx(expected[name][0], rel=1e-12), name
                assert group["weight_decay"] == expected[name][1], name

    start = torch.load(published, weights_only=True)["model"]
    state = trained.model.state_dict()
    assert set(start) == {k for k in state if not HEAD(k)}
    assert all(not torch.equal(state[k], start[k]) for k in ("cls_token", "patch_embed.proj.weight",
                                                            "encoder.layers.0.ffn.fc2.weight"))
    assert trained.model.head.out_features == 2 and trained.model.feat_layers == (1,)


def test_frozen_encoder_stays_bit_identical(cohort, published, tmp_path):
    seen = []
    train(_recipe(cohort, published, tmp_path, "freeze_encoder=true"), on_epoch_end=_watch(tmp_path, seen))
    start = torch.load(published, weights_only=True)["model"]
    for epoch in seen:
        assert sorted(n for group in epoch["groups"] for n in group["param_names"]) == ["head.bias", "head.weight"]
        for key, value in start.items():
            assert torch.equal(epoch["model"][key], value), key
    for fold in ("0", "1"):
        first, last = [e["model"]["head.weight"] for e in seen if e["fold"] == fold]
        assert not torch.equal(first, last)  # the head trains
    final = load_trained_model(tmp_path / "fold_1" / "checkpoint.pt").model.state_dict()
    assert all(torch.equal(final[key], value) for key, value in start.items())


def test_finetune_settings_are_checked(cohort, published, tmp_path):
    with pytest.raises(ConfigError, match="set init_weights"):
        _recipe(cohort, published, tmp_path, "init_weights=null")
    with pytest.raises(ConfigError, match=r"layer_decay must be in \(0, 1\]"):
        _recipe(cohort, published, tmp_path, "layer_decay=1.5")
    with pytest.raises(ValueError, match="layer_decay needs a model with a stack of layers; ABMIL"):
        train(_recipe(cohort, published, tmp_path / "abmil", "model=abmil", "model_args={}", "init_weights=null",
                      "new_head=false"))
    # without new_head the missing head is an error that says what to do
    with pytest.raises(SlideWeightsError, match=r"Only the task head \(head\) differs.*pass new_head=True"):
        train(_recipe(cohort, published, tmp_path / "strict", "new_head=false"))


@pytest.mark.parametrize("problem", ["head", "truncated"])
def test_cli_train_with_an_unfit_init_checkpoint_fails_in_one_line(problem, cohort, published, tmp_path):
    init = published
    if problem == "truncated":
        init = tmp_path / "cut.pth"
        init.write_bytes(published.read_bytes()[:1000])
    args = [f"csv={cohort.csv}", f"features_dir={cohort.features_dir}", f"out_dir={tmp_path / 'run'}",
            f"init_weights={init}", "tiny=true", "model_args.feat_layers=[1]", "device=cpu", "new_head=false"]
    result = CliRunner().invoke(app, ["train", str(RECIPE), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(init) in errors[0] and "Traceback" not in result.output
    assert ("pass new_head=True" if problem == "head" else "truncated or damaged") in errors[0]
