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
