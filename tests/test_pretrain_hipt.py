"""`histoscope pretrain hipt256` / `hipt4k`: HIPT's two DINO levels. Region grids and crops against
HIPT's own layout, a 4K run whose student learns its teacher and whose export the `hipt` slide
model loads, and the whole chain on sample slides (ViT-256 -> embed -> ViT-4K -> hipt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import histoscope
import torch

from histoscope.io.features_h5 import write_features
from histoscope.pretrain import get_objective, load_pretrain_recipe, pretrain
from histoscope.pretrain.data import StepStream
from histoscope.pretrain.feature_data import RegionFeatureIndex, find_feature_slides
from histoscope.pretrain.hipt import RegionCrops
from histoscope.pretrain.objective import RunInfo
from histoscope.slide import load_slide_model
from histoscope.slide.models.hipt import load_vit4k_dino, region_grids

RECIPES = Path(histoscope.__file__).parent / "pretrain" / "recipes"  # shipped with the package
TILE = 512
ATTRS = {"patch_size": 256, "patch_size_level0": TILE, "target_mpp": 0.5, "level0_mpp": 0.25}


def _features(folder: Path, *, n_slides=3, side=40, dim=16, seed=1, fill=0.8) -> Path:
    """Slides of side x side tile grids (fill: share present), embeddings smooth over the grid."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    freqs = rng.normal(size=(dim, 2)) * 0.3
    for s in range(n_slides):
        rows, cols = np.mgrid[0:side, 0:side]
        present = rng.random((side, side)) < fill
        grid = np.stack([cols[present], rows[present]], 1)
        features = np.sin(grid @ freqs.T + rng.uniform(0, 2 * np.pi, dim)) + 0.05 * rng.normal(size=(len(grid), dim))
        write_features(folder / f"slide{s}.h5", features.astype(np.float32), grid * TILE, coords_attrs=ATTRS)
    return folder


def test_region_grids_are_the_hipt_models(tmp_path):
    from histoscope.io.features_h5 import read_features

    folder = _features(tmp_path / "f", n_slides=1, side=35, fill=0.6)
    slides = find_feature_slides([folder])
    index = RegionFeatureIndex(slides, region_tiles=16, min_tiles=1)
    features, coords, _ = read_features(slides[0].path)
    grids, regions, _, _ = region_grids(torch.from_numpy(features)[None], torch.from_numpy(coords)[None],
                                        torch.ones(1, len(features), dtype=torch.bool), tile_size=TILE)
    assert len(index) == len(regions) == 9  # 35 tiles per edge: 3 x 3 regions
    assert np.array_equal(index.regions[0], regions[:, 1:].numpy())  # (row, col), sorted
    reader = index.reader()
    samples, errors = reader.read(np.arange(len(index)))
    assert not errors
    for sample, grid in zip(samples, grids):
        np.testing.assert_array_equal(sample.reshape(256, -1), grid.numpy())


def test_region_crops_lay_out_channels_as_hipt():
    """HIPT turns a region's [256, D] sequence into [D, 16, 16] by unfold(0, 16, 16).transpose(0, 1)."""
    sequence = torch.randn(256, 8)
    reference = sequence.unfold(0, 16, 16).transpose(0, 1)  # (D, 16, 16)
    crops = RegionCrops(global_size=16, local_number=1, local_size=4, hflip=0.0)
    glob, local = crops(sequence.view(16, 16, 8).numpy(), np.random.default_rng(0))
    assert glob.shape == (2, 8, 16, 16) and local.shape == (1, 8, 4, 4)
    assert torch.equal(torch.from_numpy(glob[0]), reference)
    flips = RegionCrops(global_size=16, local_number=0, local_size=4, hflip=1.0)
    assert torch.equal(torch.from_numpy(flips(sequence.view(16, 16, 8).numpy(), np.random.default_rng(0))[0][1]),
                       reference.flip(-1))  # RandomHorizontalFlip: the last (column) axis


def _student_teacher_loss(recipe, state, *, student_state) -> float:
    """DINO loss of a student against the trained teacher's targets on one fixed batch."""
    info = RunInfo(total_iters=recipe.common.total_iters, epoch_length=recipe.common.optim.epoch_length,
                   global_batch=16, device=torch.device("cpu"), seed=recipe.common.seed)
    spec = get_objective("hipt4k")
    objective = spec.build(recipe.config, recipe.common, info)
    initial = {k: v.clone() for k, v in objective.student.state_dict().items()}
    objective.load_state_dict(state)
    if student_state == "initial":
        objective.student.load_state_dict(initial)
    objective.eval()
    stream = StepStream(spec.index(recipe.config, recipe.common, None), collate=objective.collate(), global_batch=16,
                        rank=0, world_size=1, seed=99, start_step=0, stop_step=1)
    with torch.no_grad():
        return float(objective(next(iter(stream)), step=recipe.common.total_iters - 1)["loss"])


def test_4k_run_learns_its_teacher_and_exports_what_hipt_loads(tmp_path, one_torch_thread):
    recipe = load_pretrain_recipe("hipt4k", RECIPES / "hipt_4k_tiny.yaml", [
        f"data.features=[{_features(tmp_path / 'features')}]", f"out_dir={tmp_path / 'run'}", "tensorboard=false",
        "log_every=5"])
    assert recipe.config.teacher.teacher_temp == 0.04 and recipe.config.teacher.momentum_teacher == 0.9
    result = pretrain(recipe, log=None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    trained = _student_teacher_loss(recipe, state, student_state="trained")
    initial = _student_teacher_loss(recipe, state, student_state="initial")
    assert trained < 0.7 * initial, (trained, initial)

    exported = result["export"]
    checkpoint = torch.load(exported, weights_only=True)
    assert {"teacher", "student", "dino_loss", "epoch"} <= set(checkpoint)
    assert "head.last_layer.weight_g" in checkpoint["teacher"] and "module.backbone.phi.0.weight" in checkpoint["student"]
    assert torch.equal(checkpoint["teacher"]["head.last_layer.weight_g"], torch.ones(64, 1))  # norm_last_layer
    note = json.loads(exported.with_suffix(".json").read_text())
    model = load_slide_model("hipt", in_dim=16, **note["arch"])
    load_vit4k_dino(model, exported)  # strict
    for key, value in model.local_vit.state_dict().items():
        assert torch.equal(value, checkpoint["teacher"][f"backbone.{key}"])
        assert torch.equal(value, state[f"teacher.backbone.{key}"])


def test_256_then_4k_on_sample_slides(tmp_path, one_torch_thread, embed_trained):
    """ViT-256 by DINO on tiles, `histoscope embed` with it, ViT-4K by DINO on those features, into `hipt`."""
    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import LocalExecutor, tile_slides

    for stain, seed in (("he", 21), ("ihc", 22)):
        make_sample_slide(tmp_path / "slides" / f"{stain}.svs", width=3072, height=3072, mpp=0.25, seed=seed,
                          stain=stain)
    assert tile_slides([tmp_path / "slides"], out_dir=tmp_path / "out", executor=LocalExecutor(workers=0),
                       progress=False).ok
    level1 = load_pretrain_recipe("hipt256", RECIPES / "hipt_256_tiny.yaml", [
        f"data.patches=[{tmp_path / 'out'}]", f"out_dir={tmp_path / 'vit256'}", "tensorboard=false", "optim.epochs=2"])
    assert level1.config.ibot.loss_weight == 0 and level1.config.dino.koleo_loss_weight == 0
    first = pretrain(level1, log=None)
    assert set(first["losses"]) >= {"dino_local_crops_loss", "dino_global_crops_loss"}
    assert not {"ibot_loss", "koleo_loss"} & set(first["losses"])
    assert first["export"].name == "timm_vit_small_patch16_224_hipt256.safetensors"
    state = torch.load(tmp_path / "vit256" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))  # no iBOT centre 0/0
    from safetensors.torch import load_file

    hipt_file = torch.load(first["export"].parent / "vit256_dino.pth", weights_only=True)  # HIPT's get_vit256 reads it
    encoder = load_file(first["export"])
    backbone = {k.removeprefix("backbone."): v for k, v in hipt_file["teacher"].items() if k.startswith("backbone.")}
    assert backbone.keys() == encoder.keys() and all(torch.equal(backbone[k], encoder[k]) for k in encoder)
    assert "blocks.1.attn.qkv.weight" in backbone and "head.last_layer.weight_v" in hipt_file["teacher"]
    assert all(k.startswith("module.") for k in hipt_file["student"])
    arch = level1.common.arch
    run = embed_trained(tmp_path / "slides", tmp_path / "out" / "patches", tmp_path / "emb",
                        encoder="timm:vit_small_patch16_224", weights=first["export"], arch=arch)
    assert run.exit_code == 0, run.output
    features = next((tmp_path / "emb").glob("features_*"))

    level2 = load_pretrain_recipe("hipt4k", RECIPES / "hipt_4k_tiny.yaml", [
        f"data.features=[{features}]", f"out_dir={tmp_path / 'vit4k'}", "tensorboard=false", "min_region_tiles=8",
        "optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=2"])
    second = pretrain(level2, log=None)
    assert all(np.isfinite(v) for v in second["losses"].values())
    note = json.loads(second["export"].with_suffix(".json").read_text())
    assert note["in_dim"] == 32 and note["arch"]["tile_size"] == 512  # 256 px at 0.5 um/px of a 0.25 um/px scan
    model = load_slide_model("hipt", in_dim=32, **note["arch"])
    load_vit4k_dino(model, second["export"])
    from histoscope.io.features_h5 import read_features

    feats, coords, _ = read_features(next(features.glob("*.h5")))
    out = model.eval()(torch.from_numpy(feats)[None], torch.from_numpy(coords)[None])
    assert out.embedding.shape == (1, 32) and torch.isfinite(out.embedding).all()


def test_hipt4k_refuses_another_slide_model(tmp_path):
    from histoscope.utils.recipe import ConfigError

    recipe = load_pretrain_recipe("hipt4k", RECIPES / "hipt_4k_tiny.yaml", [
        f"data.features=[{_features(tmp_path / 'f', n_slides=1, side=16)}]", "encoder=abmil", "arch={}"])
    info = RunInfo(total_iters=1, epoch_length=1, global_batch=1, device=torch.device("cpu"), seed=0)
    with pytest.raises(ConfigError, match="hipt"):
        get_objective("hipt4k").build(recipe.config, recipe.common, info)

