"""`histoscope pretrain slide_mae`: tile masking against a reference written here, padding
invariance of the masked reconstruction, and a short run on features files that lowers the
loss and exports what `load_slide_model("gigapath_slide", weights=...)` loads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import histoscope
import torch

from histoscope.io.features_h5 import write_features
from histoscope.pretrain import get_objective, load_pretrain_recipe, pretrain
from histoscope.pretrain.objective import RunInfo
from histoscope.pretrain.slide_mae import SlideMAECollate, SlideMAEStudent, keep_by_noise
from histoscope.slide import load_slide_model

RECIPES = Path(histoscope.__file__).parent / "pretrain" / "recipes"  # shipped with the package
TILE = 512  # level-0 px per tile


def make_features(folder: Path, *, n_slides: int = 4, dim: int = 16, side: int = 24, seed: int = 0) -> Path:
    """Slides whose tile embeddings vary smoothly over the tile grid, plus noise: a masked tile
    can be told from its neighbours."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    freqs = rng.normal(size=(dim, 2)) * 0.3
    for s in range(n_slides):
        rows, cols = np.mgrid[0:side, 0:side]
        present = rng.random((side, side)) < 0.8
        grid = np.stack([cols[present], rows[present]], 1)  # (N, 2) (col, row)
        features = np.sin(grid @ freqs.T + rng.uniform(0, 2 * np.pi, dim)) + 0.05 * rng.normal(size=(len(grid), dim))
        write_features(folder / f"slide{s}.h5", features.astype(np.float32), grid * TILE,
                       coords_attrs={"patch_size": 256, "patch_size_level0": TILE, "target_mpp": 0.5,
                                     "level0_mpp": 0.25})
    return folder


def test_keep_by_noise_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 10, generator=g)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 7:] = False
    valid[2, 3:] = False
    keep = keep_by_noise(noise, valid, 0.75)
    for b in range(3):
        n = int(valid[b].sum())
        ranked = sorted(range(n), key=lambda i: float(noise[b, i]))
        expected = set(ranked[: max(1, int(n * 0.25))])  # MAE's int(L * (1 - ratio)), at least one
        assert {i for i in range(10) if keep[b, i]} == expected


def _student(in_dim=16, **arch):
    torch.manual_seed(0)
    encoder = load_slide_model("gigapath_slide", in_dim=in_dim, tiny=True, dropout=0.0, drop_path_rate=0.0,
                               tile_size=TILE, **arch)
    return SlideMAEStudent(encoder=encoder, mask_ratio=0.75, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=4, mlp_ratio=4.0).eval()


def test_a_slide_reconstructs_the_same_alone_and_padded_in_a_batch():
    rng = np.random.default_rng(1)
    slides = [{"features": rng.normal(size=(n, 16)).astype(np.float32),
               "coords": rng.integers(0, 40, size=(n, 2)) * TILE} for n in (37, 90)]
    collate = SlideMAECollate(max_tiles=1000)
    both = collate(slides, positions=np.array([5, 6]), step=0, rank=0, world_size=1, seed=3)
    alone = collate(slides[:1], positions=np.array([5]), step=0, rank=0, world_size=1, seed=3)
    assert both["valid"].sum(1).tolist() == [37, 90] and torch.equal(both["noise"][0, :37], alone["noise"][0])
    student = _student()
    with torch.no_grad():
        pred_both, mask_both = student(both["features"], both["coords"], both["valid"], both["noise"])
        pred_alone, mask_alone = student(alone["features"], alone["coords"], alone["valid"], alone["noise"])
    assert torch.equal(mask_both[0, :37], mask_alone[0]) and mask_both[0, 37:].sum() == 0
    assert int(mask_alone.sum()) == 37 - int(37 * 0.25)
    torch.testing.assert_close(pred_both[0, :37], pred_alone[0], rtol=1e-4, atol=1e-5)


def _fixed_batch_loss(recipe, state=None) -> float:
    from histoscope.pretrain.data import StepStream

    info = RunInfo(total_iters=recipe.common.total_iters, epoch_length=recipe.common.optim.epoch_length,
                   global_batch=4, device=torch.device("cpu"), seed=recipe.common.seed)
    spec = get_objective("slide_mae")
    objective = spec.build(recipe.config, recipe.common, info)
    if state is not None:
        objective.load_state_dict(state)
    stream = StepStream(spec.index(recipe.config, recipe.common, None), collate=objective.collate(), global_batch=4,
                        rank=0, world_size=1, seed=99, start_step=0, stop_step=1, chunk=1, buffer=4)
    with torch.no_grad():
        return float(objective(next(iter(stream)), step=0)["loss"])


def test_short_run_lowers_the_loss_and_exports_what_the_slide_model_loads(tmp_path, one_torch_thread):
    features = make_features(tmp_path / "features")
    recipe = load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [
        f"data.features=[{features}]", f"out_dir={tmp_path / 'run'}", "optim.base_lr=0.003", "log_every=5",
        "tensorboard=false"])
    result = pretrain(recipe, log=None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    before, after = _fixed_batch_loss(recipe), _fixed_batch_loss(recipe, state)
    assert after < 0.7 * before, (before, after)

    exported = result["export"]
    note = json.loads(exported.with_suffix(".json").read_text())
    assert note["arch"]["tile_size"] == TILE and note["in_dim"] == 16
    checkpoint = torch.load(exported, weights_only=True)
    assert list(checkpoint) == ["model"]  # as slide_encoder.pth is published
    model = load_slide_model("gigapath_slide", in_dim=16, weights=exported, **note["arch"])  # strict
    assert model.state_dict().keys() == checkpoint["model"].keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["model"].items())
    torch.manual_seed(recipe.common.seed)
    initial = load_slide_model("gigapath_slide", in_dim=16, **note["arch"])
    changed = [k for k, v in checkpoint["model"].items() if not torch.equal(initial.state_dict()[k], v)]
    assert "patch_embed.proj.weight" in changed and "encoder.layers.1.ffn.fc2.weight" in changed
    assert not any(k.startswith("norm.") for k in changed)  # pooling norm: not part of the objective

    # continued pretraining starts from a published-layout slide_encoder.pth, loaded strictly
    again = load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [
        f"data.features=[{features}]", f"out_dir={tmp_path / 'again'}", f"weights={exported}"])
    info = RunInfo(total_iters=1, epoch_length=1, global_batch=2, device=torch.device("cpu"), seed=5)
    continued = get_objective("slide_mae").build(again.config, again.common, info)
    assert all(torch.equal(continued.student.encoder.state_dict()[k], v) for k, v in checkpoint["model"].items())


def test_slide_mae_needs_features_and_a_longnet(tmp_path):
    from histoscope.utils.recipe import ConfigError

    with pytest.raises(ConfigError, match="data.features"):
        load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [f"data.patches=[{tmp_path}]"])
    features = make_features(tmp_path / "f", n_slides=1, side=4)
    recipe = load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [
        f"data.features=[{features}]", "encoder=abmil", "arch={}"])
    info = RunInfo(total_iters=1, epoch_length=1, global_batch=1, device=torch.device("cpu"), seed=0)
    with pytest.raises(ConfigError, match="LongNet"):
        get_objective("slide_mae").build(recipe.config, recipe.common, info)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, one_torch_thread):
    """Slides streamed from features files resume mid-epoch like tiles: same weights as an uninterrupted run."""
    features = make_features(tmp_path / "features", n_slides=3, side=12)

    def recipe(out):
        return load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [
            f"data.features=[{features}]", f"out_dir={out}", "optim.epochs=2", "checkpoint_every=3",
            "tensorboard=false"])

    class Killed(Exception):
        pass

    def kill(step):
        if step == 4:
            raise Killed

    whole = pretrain(recipe(tmp_path / "whole"), log=None)
    with pytest.raises(Killed):
        pretrain(recipe(tmp_path / "killed"), log=None, on_step_end=kill)
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    messages = []
    resumed = pretrain(recipe(tmp_path / "killed"), log=messages.append)
    assert any("resuming" in m and "at step 4" in m for m in messages)
    one = torch.load(whole["export"], weights_only=True)["model"]
    again = torch.load(resumed["export"], weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(again[key], one[key], rtol=0, atol=1e-6)


def test_files_that_are_not_features_are_named_and_a_fixed_recipe_reruns(tmp_path):
    """A patches file given as features: a one-line error naming it; the corrected rerun into the same
    folder starts (nothing was checkpointed, so there is no other run to protect)."""
    bad = tmp_path / "not_features"
    bad.mkdir()
    write_features(tmp_path / "ok" / "s.h5", np.ones((4, 16), np.float32), np.arange(8).reshape(4, 2) * TILE,
                   coords_attrs={"patch_size": 256, "patch_size_level0": TILE})
    import h5py

    with h5py.File(bad / "s_patches.h5", "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
    args = [f"out_dir={tmp_path / 'run'}", "max_steps=1", "tensorboard=false"]
    with pytest.raises(FileNotFoundError, match="s_patches.h5.*features"):
        pretrain(load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml", [f"data.features=[{bad}]", *args]),
                 log=None)
    result = pretrain(load_pretrain_recipe("slide_mae", RECIPES / "slide_mae_tiny.yaml",
                                           [f"data.features=[{tmp_path / 'ok'}]", *args]), log=None)
    assert result["export"].is_file()
