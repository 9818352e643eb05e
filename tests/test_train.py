"""Training slide models on synthetic MIL cohorts with known answers: learning, attention,
survival, patient-level splits, exact resumption, recipes, losses and bag loading."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import histoscope
from histoscope.cli.main import app
from histoscope.io.features_h5 import read_features, write_features
from histoscope.slide import list_slide_models, load_slide_model
from histoscope.io.columns import read_columns
from histoscope.slide.bags import collate_bags
from histoscope.slide.trained import load_trained_model
from histoscope.train import (
    BagDataset,
    ConfigError,
    FeatureCache,
    TrainConfig,
    cox_loss,
    discrete_time_nll,
    load_recipe,
    make_splits,
    make_task,
    read_table,
    time_bins,
    train,
)
from histoscope.train.synthetic import make_mil_cohort, make_survival_cohort

RECIPES = Path(histoscope.__file__).parent / "train" / "recipes"  # shipped with the package
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(cohort, out: Path, **overrides) -> TrainConfig:
    settings = dict(csv=str(cohort.csv), features_dir=str(cohort.features_dir), out_dir=str(out), model="abmil_gated",
                    tiny=True, folds=5, epochs=20, lr=5e-3, batch_size=1, patience=5, device="cpu",
                    precision="fp32", bootstrap=200, seed=0)
    settings.update(overrides)
    survival = settings.pop("survival", {})
    config = TrainConfig(**settings)
    for key, value in survival.items():
        setattr(config.survival, key, value)
    return config


@pytest.fixture(scope="module")
def mil(tmp_path_factory):
    return make_mil_cohort(tmp_path_factory.mktemp("mil"), slides=40, seed=0)


@pytest.fixture(scope="module")
def mil_run(mil, tmp_path_factory):
    out = tmp_path_factory.mktemp("mil_run")
    return out, train(_config(mil, out))


def test_mil_classification_learns_the_key_tiles(mil_run):
    out, results = mil_run
    auroc = results["pooled"]["metrics"]["auroc"]
    print(f"pooled AUROC {auroc['value']:.3f} ({auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})")
    assert auroc["value"] >= 0.95
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert len(results["folds"]) == 5 and results["pooled"]["n"] == 40
    slides = []
    for k in range(5):
        assert (out / f"fold_{k}" / "checkpoint.pt").is_file()
        assert not (out / f"fold_{k}" / "train_state.pt").exists()  # removed once the fold is done
        slides += read_columns(out / f"fold_{k}" / "predictions.csv")["slide_id"]
    assert sorted(slides) == sorted(f"slide_{i:03d}" for i in range(40))  # each slide tested exactly once
    assert json.loads((out / "results.json").read_text())["pooled"]["metrics"]["auroc"]["value"] == auroc["value"]
    assert "**pooled** | 40 |" in (out / "results.md").read_text()
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_attention_points_at_the_positive_tiles(mil, mil_run):
    out, _ = mil_run
    hits = total = 0
    for k in range(5):
        trained = load_trained_model(out / f"fold_{k}" / "checkpoint.pt")
        columns = read_columns(out / f"fold_{k}" / "predictions.csv")
        for slide_id, label, prob in zip(columns["slide_id"], columns["label"], columns["prob_positive"]):
            features, coords, _ = read_features(mil.features_dir / f"{slide_id}.h5")
            with torch.no_grad():
                output = trained.model(torch.from_numpy(features)[None], torch.from_numpy(coords).float()[None])
            # the checkpoint reproduces the fold's predictions
            assert torch.softmax(output.logits, -1)[0, 1].item() == pytest.approx(float(prob), abs=1e-6)
            if label == "positive":
                top3 = np.argsort(-output.scores[0].numpy())[:3]
                hits += len(set(top3.tolist()) & set(mil.key_tiles[slide_id].tolist()))
                total += 3
    print(f"top-3 attention on key tiles: {hits}/{total}")
    assert hits / total >= 0.8


def test_checkpoint_loads_through_the_registry(mil_run):
    out, _ = mil_run
    path = out / "fold_0" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["histoscope_model"] == "abmil_gated" and checkpoint["task"] == "classification"
    assert checkpoint["label_map"] == {"negative": 0, "positive": 1} and checkpoint["in_dim"] == 32
    model = load_slide_model("abmil_gated", in_dim=32, num_outputs=checkpoint["num_outputs"], weights=path,
                             **checkpoint["arch"])
    trained = load_trained_model(path)
    x = torch.randn(2, 30, 32)
    model.eval()
    assert torch.equal(model(x).logits, trained.model(x).logits)


def test_cli_train_with_recipe_and_overrides(mil, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "csv": str(mil.csv),
                                      "features_dir": str(mil.features_dir), "model": "abmil_gated",
                                      "tiny": True, "epochs": 3, "precision": "fp32", "device": "cpu"}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "epochs=20", "lr=5e-3", "bootstrap=200",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output and "results.md" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["pooled"]["metrics"]["auroc"]["value"] >= 0.95
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 20

    bad = CliRunner().invoke(app, ["train", str(recipe), "epoch=3", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "did you mean 'epochs'" in bad.output


def test_survival_cox_reaches_c_index(tmp_path):
    cohort = make_survival_cohort(tmp_path / "cohort", slides=80, seed=0)
    config = _config(cohort, tmp_path / "run", task="survival", epochs=30, batch_size=8, patience=10,
                     survival={"loss": "cox"})
    results = train(config)
    c_index = results["pooled"]["metrics"]["c_index"]["value"]
    print(f"Cox pooled c-index {c_index:.3f}")
    assert c_index >= 0.8
    assert (tmp_path / "run" / "km.png").is_file()
    checkpoint = torch.load(tmp_path / "run" / "fold_0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["num_outputs"] == 1 and checkpoint["survival_loss"] == "cox"


def test_survival_discrete_time(tmp_path):
    # Discrete hazards need the signal in more tiles than Cox does at this cohort size.
    cohort = make_survival_cohort(tmp_path / "cohort", slides=80, key=(20, 40), seed=1)
    config = _config(cohort, tmp_path / "run", task="survival", epochs=30, batch_size=8, val_fraction=0.0,
                     survival={"loss": "discrete", "bins": 4})
    results = train(config)
    c_index = results["pooled"]["metrics"]["c_index"]["value"]
    print(f"discrete-time pooled c-index {c_index:.3f}")
    assert c_index >= 0.65
    checkpoint = torch.load(tmp_path / "run" / "fold_0" / "checkpoint.pt", weights_only=True)
    assert checkpoint["num_outputs"] == 4 and len(checkpoint["time_bins"]) == 3
    columns = read_columns(tmp_path / "run" / "fold_0" / "predictions.csv")
    survival = np.array([[float(columns[f"survival_bin{k}"][i]) for k in range(4)] for i in range(3)])
    assert np.all(np.diff(survival, axis=1) <= 0) and np.all((survival > 0) & (survival < 1))


def test_regression_bf16_balanced_sampling_smoke(tmp_path):
    cohort = make_survival_cohort(tmp_path / "cohort", slides=30, seed=2)  # its `risk` column is the target
    results = train(_config(cohort, tmp_path / "reg", task="regression", label_column="risk", folds=3, epochs=3,
                            batch_size=4, precision="bf16", bootstrap=50))
    assert set(results["pooled"]["metrics"]) == {"rmse", "mae", "r2", "pearson_r"}
    assert np.isfinite(results["pooled"]["metrics"]["rmse"]["value"])
    assert (tmp_path / "reg" / "regression.png").is_file()
    mil = make_mil_cohort(tmp_path / "mil", slides=12, seed=3)
    results = train(_config(mil, tmp_path / "bal", folds=2, epochs=2, class_weighting=False, balanced_sampling=True,
                            max_tiles=32, accumulate=2, bootstrap=20, model="clam_sb"))
    assert results["pooled"]["n"] == 12


@pytest.fixture(scope="module")
def small_mil(tmp_path_factory):
    return make_mil_cohort(tmp_path_factory.mktemp("small"), slides=12, tiles=(20, 40), seed=7)


@pytest.mark.parametrize("name", list_slide_models())
def test_every_registered_model_trains_in_bf16_and_reloads(name, small_mil, tmp_path):
    results = train(_config(small_mil, tmp_path, model=name, folds=2, epochs=1, batch_size=4, precision="bf16",
                            bootstrap=10))
    assert results["pooled"]["n"] == 12
    trained = load_trained_model(tmp_path / "fold_0" / "checkpoint.pt")
    assert trained.meta["histoscope_model"] == name and trained.outputs.class_names == ["negative", "positive"]
    if "tile_size" in trained.meta["arch"]:  # position-aware models index the 512-px level-0 grid of the features
        assert trained.meta["arch"]["tile_size"] == 512


def test_splits_keep_patients_together_and_are_stratified(tmp_path):
    cohort = make_mil_cohort(tmp_path, slides=60, slides_per_patient=3, tiles=(5, 8), seed=4)
    samples = read_table(cohort.csv, task="classification")
    task = make_task(TrainConfig(csv="x", features_dir="y"), samples)
    splits = make_splits(samples, task.strata(samples), folds=5, val_fraction=0.25, seed=0)
    tested = []
    for split in splits:
        roles = {}
        for role in ("train", "val", "test"):
            for i in getattr(split, role):
                roles.setdefault(samples[i].patient_id, set()).add(role)
        assert all(len(r) == 1 for r in roles.values())  # no patient in two roles
        test_labels = [samples[i].label for i in split.test]
        assert len(split.test) == 12 and test_labels.count("positive") in (6,)  # 2 patients of each class
        val_labels = {samples[i].label for i in split.val}
        assert val_labels == {"positive", "negative"}
        tested += split.test
    assert sorted(tested) == list(range(60))
    assert make_splits(samples, task.strata(samples), folds=5, val_fraction=0.25, seed=0) == splits  # fixed seed


def _write_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_fixed_folds_and_split_column_are_honoured(tmp_path):
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i // 2}", "label": "ab"[i // 2 % 2], "fold": str(i // 2 % 3 + 1)}
            for i in range(24)]
    samples = read_table(_write_table(tmp_path / "folds.csv", rows), task="classification")
    splits = make_splits(samples, [s.label for s in samples], folds=5, val_fraction=0.2, seed=0)
    assert [s.fold for s in splits] == ["1", "2", "3"]
    for split in splits:
        assert {samples[i].fold for i in split.test} == {split.fold}
        assert all(samples[i].fold != split.fold for i in split.train + split.val)
    rows[1]["fold"] = "3"  # patient p0 now in folds 1 and 3
    samples = read_table(_write_table(tmp_path / "leak.csv", rows), task="classification")
    with pytest.raises(ValueError, match="patient 'p0'"):
        make_splits(samples, [s.label for s in samples], folds=5, val_fraction=0.2, seed=0)

    rows = [{"slide_id": f"s{i}", "label": "ab"[i % 2], "split": ["train", "train", "val", "test"][i % 4]}
            for i in range(16)]
    samples = read_table(_write_table(tmp_path / "split.csv", rows), task="classification")
    (split,) = make_splits(samples, [s.label for s in samples], folds=5, val_fraction=0.2, seed=0)
    assert [samples[i].split for i in split.test] == ["test"] * 4
    assert [samples[i].split for i in split.val] == ["val"] * 4 and len(split.train) == 8


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_results(tmp_path):
    cohort = make_mil_cohort(tmp_path / "cohort", slides=16, tiles=(30, 60), seed=5)
    settings = dict(folds=2, epochs=6, patience=100, batch_size=2, max_tiles=40, bootstrap=50)
    reference = train(_config(cohort, tmp_path / "whole", **settings))

    def kill(*, fold, epoch, record):
        if fold == "1" and epoch == 2:
            raise _Killed

    config = _config(cohort, tmp_path / "killed", **settings)
    with pytest.raises(_Killed):
        train(config, on_epoch_end=kill)
    assert (tmp_path / "killed" / "fold_0" / "fold_done.json").exists()
    assert not (tmp_path / "killed" / "fold_1" / "fold_done.json").exists()
    assert torch.load(tmp_path / "killed" / "fold_1" / "train_state.pt", weights_only=True)["epoch"] == 2
    messages = []
    resumed = train(config, log=messages.append)
    assert any("resuming after epoch 2" in m for m in messages)
    assert resumed["pooled"] == reference["pooled"]
    for k in range(2):
        a = read_columns(tmp_path / "whole" / f"fold_{k}" / "predictions.csv")
        b = read_columns(tmp_path / "killed" / f"fold_{k}" / "predictions.csv")
        assert a["slide_id"] == b["slide_id"]
        np.testing.assert_allclose(np.array(a["prob_positive"], float), np.array(b["prob_positive"], float),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="differs in lr"):
        train(_config(cohort, tmp_path / "killed", **{**settings, "lr": 1e-3}))


def test_recipes_and_overrides(tmp_path):
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        if "pairs" in recipe or "objective" in recipe:
            continue  # train-align (test_align_train.py) and pretrain (test_pretrain_run.py) recipes
        if "stage1" in recipe:
            continue  # train-chat recipes (test_chat_train.py)
        config = load_recipe(path)
        assert config.csv and config.features_dir, path
    config = load_recipe(RECIPES / "survival_cox.yaml", ["survival.loss=discrete", "survival.bins=6", "lr=1e-4",
                                                         "model_args.dropout=0.1", "max_tiles=null", "tiny=true"])
    assert config.survival.loss == "discrete" and config.survival.bins == 6
    assert config.lr == 1e-4 and config.model_args == {"dropout": 0.1} and config.max_tiles is None and config.tiny
    with pytest.raises(ConfigError, match="unknown recipe key 'learning_rate'.*valid keys: .*weight_decay"):
        load_recipe(RECIPES / "survival_cox.yaml", ["learning_rate=1"])
    with pytest.raises(ConfigError, match="'survival.los'.*did you mean 'survival.loss'"):
        load_recipe(RECIPES / "survival_cox.yaml", ["survival.los=cox"])
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        load_recipe(RECIPES / "survival_cox.yaml", ["epochs=ten"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_recipe(RECIPES / "survival_cox.yaml", ["epochs"])
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        load_recipe(RECIPES / "survival_cox.yaml", ["batch_size=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classification\nmodel: abmil\nfoo: 1\n")
    with pytest.raises(ConfigError, match="unknown recipe key 'foo'"):
        load_recipe(bad)


def test_losses_known_values():
    risk = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    time = torch.tensor([3.0, 5.0, 3.0, 1.0, 8.0])
    event = torch.tensor([1, 0, 1, 1, 0])
    expected = []
    for i in range(5):  # Breslow: tied events share the full risk set
        if event[i]:
            at_risk = time >= time[i]
            expected.append(-(risk[i] - torch.log(torch.exp(risk[at_risk]).sum())))
    assert cox_loss(risk, time, event).item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-6)
    assert cox_loss(risk, time, torch.zeros(5)).item() == 0.0

    logits = torch.tensor([[0.0, 0.0, 0.0]])
    # hazard 1/2 per bin: death in bin 1 has probability 1/2 * 1/2; survival through bin 1 also 1/4
    assert discrete_time_nll(logits, torch.tensor([1]), torch.tensor([1])).item() == pytest.approx(np.log(4))
    assert discrete_time_nll(logits, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(np.log(4))
    assert discrete_time_nll(logits, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(np.log(2))
    assert time_bins(np.arange(1, 101, dtype=float), 4) == pytest.approx([25.75, 50.5, 75.25])


def test_bags_cache_collate_and_padding_invariance(tmp_path):
    rng = np.random.default_rng(6)
    paths = []
    for i, n in enumerate([5, 9, 3]):
        paths.append(write_features(tmp_path / f"b{i}.h5", rng.normal(size=(n, 8)),
                                    np.arange(2 * n).reshape(n, 2) * 512))
    cache = FeatureCache(max_bytes=(5 + 9) * (8 * 4 + 16))  # room for bags 0 and 1 only
    dataset = BagDataset(paths, cache, max_tiles=4)
    for i in (0, 1, 0, 1):
        dataset.bag(i)
    assert cache.reads == 2
    dataset.bag(2)
    dataset.bag(0)  # bag 0 was least recently used when bag 2 arrived
    assert cache.reads == 4 and cache.bytes <= cache.max_bytes
    sub = dataset.bag(1, subsample_seed=(0, 0, 3))
    assert len(sub[0]) == 4 and np.array_equal(sub[0], dataset.bag(1, subsample_seed=(0, 0, 3))[0])
    assert not np.array_equal(sub[0], dataset.bag(1, subsample_seed=(0, 0, 4))[0])
    assert len(dataset.bag(1)[0]) == 9  # no seed: the whole bag

    features, coords, mask = collate_bags([dataset.bag(i) for i in range(3)])
    assert features.shape == (3, 9, 8) and coords.shape == (3, 9, 2) and mask.shape == (3, 9)
    assert mask.sum(1).tolist() == [5, 9, 3] and features[2, 3:].abs().sum() == 0
    model = load_slide_model("abmil_gated", in_dim=8, num_outputs=2, tiny=True).eval()
    with torch.no_grad():
        batched = model(features, coords, mask).logits
        alone = torch.cat([model(*[t[i : i + 1, : int(mask[i].sum())] for t in (features, coords, mask)]).logits
                           for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_configuration_errors(mil, tmp_path):
    with pytest.raises(ValueError, match="model_args \\['depth'\\]"):
        train(_config(mil, tmp_path / "a", model_args={"depth": 3}))
    table = _write_table(tmp_path / "missing.csv", [{"slide_id": "nope", "label": "a"}, {"slide_id": "x", "label": "b"}])
    with pytest.raises(FileNotFoundError, match="2 of 2 slides have no features file"):
        train(_config(mil, tmp_path / "b", csv=str(table)))
    table = _write_table(tmp_path / "nolabel.csv", [{"slide_id": "x", "time": "1"}])
    with pytest.raises(ValueError, match="missing \\['label'\\]"):
        read_table(table, task="classification")
