"""What a new user meets first: recipes found by name from any directory, warnings when the
data are too small for the folds or the validation split, metrics that cannot be computed
shown as n/a, the final model trained on all slides, heatmap colour bars and absolute slide
paths in patches files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import histoscope
from histoscope.cli.main import app
from histoscope.utils.recipe import ConfigError, list_recipes, read_recipe, resolve_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
PACKAGE = Path(histoscope.__file__).parent


# ---- recipes by name -----------------------------------------------------------------------

@pytest.mark.parametrize("package, folder", [("histoscope.train", "train"), ("histoscope.train.align", "train/align"),
                                             ("histoscope.pretrain", "pretrain")])
def test_shipped_recipes_resolve_by_name_from_any_directory(package, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    shipped = sorted((PACKAGE / folder / "recipes").glob("*.yaml"))
    assert shipped and list(list_recipes(package)) == [p.stem for p in shipped]
    for path in shipped:
        assert resolve_recipe(path.stem, package) == path
        assert resolve_recipe(path.name, package) == path
        assert read_recipe(path.stem, ["seed=3"], package=package) == {**yaml.safe_load(path.read_text()), "seed": 3}


def test_a_path_wins_over_a_name_and_unknown_names_list_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "abmil_classification.yaml"
    own.write_text("task: regression\n")
    assert resolve_recipe("abmil_classification.yaml", "histoscope.train").resolve() == own  # the user's file
    assert resolve_recipe("abmil_classification", "histoscope.train") == PACKAGE / "train/recipes/abmil_classification.yaml"
    with pytest.raises(FileNotFoundError, match="abmil_clasification: no such recipe.*abmil_classification, "):
        resolve_recipe("abmil_clasification", "histoscope.train")
    with pytest.raises(FileNotFoundError, match="sub/x.yaml: no such recipe file"):
        resolve_recipe("sub/x.yaml", "histoscope.train")
    with pytest.raises(ConfigError, match="unknown recipe key 'epoch'"):
        from histoscope.train import load_recipe
        load_recipe("survival_discrete", ["epoch=3"])


def test_cli_lists_recipes_and_takes_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--list"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines() if not line.startswith("(")]
    assert names == list(list_recipes("histoscope.train"))
    assert "abmil_classification     Gated attention MIL" in result.output
    for command, name in (["train-align"], "align_tiny"), (["pretrain", "dinov2"], "dinov2_tiny"):
        listed = runner.invoke(app, [*command[:1], "--list"])
        assert listed.exit_code == 0 and name in listed.output, listed.output
    # a name resolves from here; the run then stops at the missing CSV, naming it
    result = runner.invoke(app, ["train", "abmil_classification", "csv=nowhere.csv", "features_dir=feats"])
    assert result.exit_code == 2 and "nowhere.csv" in result.output, result.output
    result = runner.invoke(app, ["train", "abmil_clasification", "csv=x.csv"])
    assert result.exit_code == 2 and "no such recipe file or shipped recipe" in result.output


# ---- small data: warnings and n/a ------------------------------------------------------------

TINY_RUN = ["tiny=true", "epochs=2", "device=cpu", "precision=fp32", "bootstrap=20", "max_tiles=null",
            "accumulate=1"]


def _train_cli(cohort, out: Path, *extra: str):
    return runner.invoke(app, ["train", "abmil_classification", f"csv={cohort.csv}",
                               f"features_dir={cohort.features_dir}", f"out_dir={out}", *TINY_RUN, *extra])


def test_too_few_slides_for_the_folds_warns_and_reports_na(tmp_path):
    from histoscope.train.synthetic import make_mil_cohort

    cohort = make_mil_cohort(tmp_path / "c", slides=4, tiles=(5, 8), seed=1)
    result = _train_cli(cohort, tmp_path / "run", "folds=4", "monitor=auroc")
    assert result.exit_code == 0, result.output
    out = result.output
    # one test slide per fold: AUROC cannot exist there; the validation sets hold one class
    for k in range(4):
        assert f"warning: fold {k}: auroc, balanced_accuracy" not in out  # bacc is defined on one class
        assert f"warning: fold {k}: auroc" in out and "reported as n/a" in out
        assert f"warning: fold {k}: auroc cannot be computed on its 1 validation slides" in out
    assert "early stopping monitors the validation loss" in out
    assert "val_auroc=n/a" in out and "val_auroc=0 " not in out and "nan" not in out
    import json
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert all(fold["metrics"]["auroc"]["value"] is None for fold in results["folds"])  # null, not 0
    assert results["pooled"]["metrics"]["auroc"]["value"] is not None  # 4 slides of 2 classes pooled
    assert len(results["warnings"]) == 8  # per fold: its 1 test and 1 validation slide (the monitor fallback is logged)
    history = json.loads((tmp_path / "run" / "fold_0" / "history.json").read_text())
    assert all(epoch["val_auroc"] is None for epoch in history)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| fold 0 | 1 | n/a |" in table and "Warnings:" in table and "nan" not in table


def test_no_validation_patients_left_warns(tmp_path):
    from histoscope.train.synthetic import make_mil_cohort

    cohort = make_mil_cohort(tmp_path / "c", slides=4, tiles=(5, 8), seed=1)
    result = _train_cli(cohort, tmp_path / "run", "folds=2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: fold 0: no validation slides (2 training patients are too few for val_fraction=0.2)" in result.output
    assert "reported as n/a" not in result.output  # each test fold holds both classes
    assert "only 2 validation slides" not in result.output


def test_a_tiny_validation_set_warns(tmp_path):
    from histoscope.train import load_recipe
    from histoscope.train.data import read_table
    from histoscope.train.run import small_data_warnings
    from histoscope.train.splits import make_splits
    from histoscope.train.synthetic import make_mil_cohort
    from histoscope.train.tasks import make_task

    cohort = make_mil_cohort(tmp_path / "c", slides=12, tiles=(5, 8), seed=1)
    config = load_recipe("abmil_classification", [f"csv={cohort.csv}", f"features_dir={cohort.features_dir}",
                                                  "folds=3"])
    samples = read_table(config.csv, task=config.task)
    splits = make_splits(samples, make_task(config, samples).strata(samples), folds=3, val_fraction=0.2, seed=0)
    warnings = small_data_warnings(config, samples, splits)
    assert [len(s.val) for s in splits] == [2, 2, 2]
    assert warnings == [f"fold {k}: only 2 validation slides, so early stopping follows noise (an AUROC of 2 slides "
                        "takes a few values only); with a small cohort set val_fraction=0 and a fixed number of "
                        "epochs" for k in range(3)]


# ---- the final model -------------------------------------------------------------------------

def test_final_model_trains_on_every_slide_for_the_median_best_epoch(tmp_path):
    import json

    import numpy as np

    from histoscope.slide.trained import load_trained_model
    from histoscope.train.run import final_epochs
    from histoscope.train.synthetic import make_mil_cohort

    cohort = make_mil_cohort(tmp_path / "c", slides=12, tiles=(5, 8), seed=2)
    out = tmp_path / "run"
    first = _train_cli(cohort, out, "folds=3", "epochs=3", "--quiet")
    assert first.exit_code == 0, first.output
    assert not (out / "final").exists() and "final model" not in first.output
    fold_checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoint.pt")}
    # the same run with final=true keeps the folds and adds the final model
    second = _train_cli(cohort, out, "folds=3", "epochs=3", "final=true", "--quiet")
    assert second.exit_code == 0, second.output
    assert f"final model (all slides, for predict): {out / 'final' / 'checkpoint.pt'}" in second.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold_*/checkpoint.pt")} == fold_checkpoints
    folds = [json.loads((out / f"fold_{k}" / "fold_done.json").read_text()) for k in range(3)]
    epochs = int(np.ceil(np.median([f["best_epoch"] + 1 for f in folds])))
    assert final_epochs(folds) == epochs
    results = json.loads((out / "results.json").read_text())
    assert results["final"] == {"checkpoint": str(out / "final" / "checkpoint.pt"), "epochs": epochs, "n_train": 12}
    history = json.loads((out / "final" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(epochs)) and "val_loss" not in history[0]
    trained = load_trained_model(out / "final" / "checkpoint.pt")
    assert trained.meta["fold"] == "final" and trained.meta["epochs"] == epochs
    assert not (out / "final" / "train_state.pt").exists()
    # a third run finds everything done
    stamp = (out / "final" / "checkpoint.pt").stat().st_mtime_ns
    assert _train_cli(cohort, out, "folds=3", "epochs=3", "final=true", "--quiet").exit_code == 0
    assert (out / "final" / "checkpoint.pt").stat().st_mtime_ns == stamp


# ---- heatmap colour bar ----------------------------------------------------------------------

def test_heatmap_colour_bar_shows_the_painted_colours_from_100_to_0_percent():
    import numpy as np
    from matplotlib import colormaps

    from histoscope.predict.heatmap import colorbar_geometry, paint_heatmap, with_colorbar

    thumbnail = np.full((300, 400, 3), 200, np.uint8)
    painted = paint_heatmap(thumbnail, np.array([[0, 0]]), 1000, (4000, 3000), np.array([1.0]), alpha=1.0)
    image = with_colorbar(painted)
    top, bar, pad, width, panel = colorbar_geometry(300)
    assert image.shape == (300, 400 + panel, 3) and bar == 240 and top == 30
    np.testing.assert_array_equal(image[:, :400], painted)  # the heatmap itself is untouched
    column = image[top : top + bar, 400 + pad + width // 2].astype(float)
    expected = np.array([colormaps["jet"](1 - (r + 0.5) / bar)[:3] for r in range(bar)]) * 255
    np.testing.assert_array_equal(column, expected.round())
    # the top of the bar is the colour a 100th-percentile tile is painted with
    np.testing.assert_array_equal(column[0], painted[0, 0])
    assert (image[:top, 400:] < 128).any() and (image[top : top + bar, 400 + pad + width + 2 :] < 128).any()  # label, ticks
    assert (image[top + bar :, 400 + pad : 400 + pad + width] == 255).all()  # white below the bar


# ---- patches files name their slide by an absolute path -----------------------------------------

def test_patches_files_store_the_slide_path_absolute(tmp_path, monkeypatch):
    import os

    from histoscope.io.sample import make_sample_slide
    from histoscope.tiling import patches_path, read_patches

    (tmp_path / "work" / "slides").mkdir(parents=True)
    make_sample_slide(tmp_path / "work" / "slides" / "a.svs", width=2048, height=1536, seed=3)
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "cohort.csv").write_text("path\nslides/a.svs\n")  # relative to the CSV
    for given, out in (("slides/a.svs", "out1"), ("./slides/../slides", "out2"), ("cohort.csv", "out3")):
        result = runner.invoke(app, ["tile", given, "--out", out, "--workers", "0"])
        assert result.exit_code == 0, result.output
        _, attrs = read_patches(patches_path(out, "a"))
        assert attrs["slide_path"] == str(tmp_path / "work" / "slides" / "a.svs")
        assert os.path.isabs(attrs["slide_path"])
