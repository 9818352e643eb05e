"""`histoscope pretrain dinov2`: a short run on sample slides, export for `embed`, the kNN hook,
2-process vs 1-process agreement, and a killed run that resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import histoscope
from histoscope import open_slide
from histoscope.encoders import get_tile_encoder_spec, list_tile_encoders, load_tile_encoder
from histoscope.io.sample import make_sample_slide
from histoscope.pipeline import LocalExecutor, tile_slides
from histoscope.pretrain import load_pretrain_recipe, pretrain
from histoscope.pretrain.backbone import MaskedViT, NotAViTError
from histoscope.tiling import read_patches

RECIPES = Path(histoscope.__file__).parent / "pretrain" / "recipes"  # shipped with the package
TINY = RECIPES / "dinov2_tiny.yaml"
ARCH = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
# The same optimisation with or without processes: no per-rank randomness (drop path) and no
# per-rank statistic (KoLeo's nearest neighbours are searched within each process's batch).
PARITY = ["student.drop_path_rate=0", "dino.koleo_loss_weight=0", "max_steps=6", "log_every=1", "tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """H&E and IHC sample slides tiled for pretraining; a labelled H&E-vs-IHC set from other slides."""
    root = tmp_path_factory.mktemp("pretrain")
    for stain, seed in (("he", 21), ("ihc", 22)):
        make_sample_slide(root / "slides" / f"{stain}.svs", width=3072, height=3072, mpp=0.25, seed=seed, stain=stain)
        make_sample_slide(root / "held_out" / f"{stain}.svs", width=4096, height=4096, mpp=0.25, seed=seed + 10,
                          stain=stain)
    for folder in ("slides", "held_out"):
        assert tile_slides([root / folder], out_dir=root / f"{folder}_out", executor=LocalExecutor(workers=0),
                           progress=False).ok
    for stain in ("he", "ihc"):
        coords, _ = read_patches(root / "held_out_out" / "patches" / f"{stain}_patches.h5")
        with open_slide(root / "held_out" / f"{stain}.svs") as slide:
            tiles = slide.read_tiles(coords[:40], size=64, mpp=2.0)
        (root / "labelled" / stain).mkdir(parents=True)
        for i, tile in enumerate(tiles):
            Image.fromarray(tile).save(root / "labelled" / stain / f"{i}.png")
    return root


def _recipe(data, out, *extra):
    return load_pretrain_recipe("dinov2", TINY, [f"data.patches=[{data / 'slides_out'}]", f"out_dir={out}", *extra])


def test_recipes_load():
    from histoscope.pretrain import get_objective

    for path in sorted(RECIPES.glob("*.yaml")):
        objective = yaml.safe_load(path.read_text()).get("objective")
        if objective:
            source = "features" if get_objective(objective).inputs == "features" else "patches"
            recipe = load_pretrain_recipe(objective, path, [f"data.{source}=[OUT]"])
            assert recipe.common.total_iters > 0


LIGHT = ["augment.grayscale=0", "augment.hue=0", "augment.color_jitter=0.2", "augment.saturation=0.1",
         "augment.hed_jitter=0.2", "optim.epochs=8", "optim.base_lr=0.2", "log_every=10", "tensorboard=false",
         # no LayerScale: the random initialisation is a genuinely input-dependent random ViT
         "arch={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8, img_size: 32, init_values: null}"]


@pytest.fixture(scope="module")
def short_run(data, tmp_path_factory):
    """40 steps with the kNN probe before training and after the last step."""
    extra = ["eval.every=40", f"eval.images={data / 'labelled'}", "eval.k=10"]
    out = tmp_path_factory.mktemp("short")
    return out, pretrain(_recipe(data, out / "run", *LIGHT, *extra), log=None)


def test_knn_probe_beats_the_random_initialisation(short_run):
    out, result = short_run
    first, last = result["evaluations"][0], result["evaluations"][-1]
    assert first["steps_done"] == 0 and last["steps_done"] == 40
    assert last["knn_acc"] >= first["knn_acc"] + 0.1, result["evaluations"]
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [-1, 39]


def test_short_run_lowers_the_dino_loss_against_its_teacher(data, short_run):
    """On one fixed batch, with the trained teacher's targets and centres: the trained student's DINO
    loss is far below the initial student's (the loss the run minimised, without its moving target)."""
    from histoscope.pretrain import get_objective
    from histoscope.pretrain.data import StepStream, TileIndex, find_slide_tiles
    from histoscope.pretrain.objective import RunInfo

    out, _ = short_run
    recipe = _recipe(data, out / "run", *LIGHT)
    state = torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    info = RunInfo(total_iters=recipe.common.total_iters, epoch_length=recipe.common.optim.epoch_length,
                   global_batch=16, device=torch.device("cpu"), seed=recipe.common.seed)
    index = TileIndex(find_slide_tiles(recipe.common.data.patches, log=lambda m: None))
    losses = {}
    for student in ("initial", "trained"):
        objective = get_objective("dinov2").build(recipe.config, recipe.common, info)
        initial = {k: v.clone() for k, v in objective.student.state_dict().items()}
        objective.load_state_dict(state)
        if student == "initial":
            objective.student.load_state_dict(initial)
        stream = StepStream(index, collate=objective.collate(), global_batch=16, rank=0, world_size=1, seed=99,
                            start_step=0, stop_step=1)
        with torch.no_grad():
            out_losses = objective.eval()(next(iter(stream)), step=recipe.common.total_iters - 1)
        losses[student] = float(out_losses["dino_local_crops_loss"] + out_losses["dino_global_crops_loss"])
    assert losses["trained"] < 0.7 * losses["initial"], losses


def test_short_run_exports_what_embed_loads(data, short_run, tmp_path, embed_trained):
    out, result = short_run
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "total_loss" in r] == [9, 19, 29, 39]
    assert all(np.isfinite(r["total_loss"]) for r in log if "total_loss" in r)
    exported = result["export"]
    note = json.loads(exported.with_suffix(".json").read_text())
    arch = {**ARCH, "init_values": None}
    assert note["arch"] == arch and note["checkpoint_format"] == "timm"
    encoder = load_tile_encoder("uni", weights=exported, **arch)  # strict: every key in UNI's layout
    state = load_file(exported)
    assert all(torch.equal(encoder.model.state_dict()[k], v) for k, v in state.items())
    initial = load_tile_encoder("uni", weights="random", **arch)  # what training started from (same seed)
    assert any(not torch.equal(initial.model.state_dict()[k], v) for k, v in state.items())
    embed_out = tmp_path / "embed"
    run = embed_trained(data / "slides", data / "slides_out" / "patches", embed_out, encoder="uni", weights=exported,
                        arch=arch)
    assert run.exit_code == 0, run.output
    assert len(list((embed_out / "features_uni").glob("*.h5"))) == 2


@pytest.mark.parametrize("name", list_tile_encoders())
def test_every_registered_vit_pretrains_and_exports_in_its_layout(name):
    from histoscope.encoders.convert import convert_checkpoint, export_checkpoint

    spec = get_tile_encoder_spec(name)
    if spec.checkpoint_format in ("ctranspath", "torchvision"):  # Swin and ResNet: a clear error
        with torch.device("meta"):
            model = spec.builder()
        with pytest.raises(NotAViTError, match="is not a ViT"):
            MaskedViT(model=model, encoder=name)
        return
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    if name == "conch":
        arch.update(pool_dim=16, pool_heads=2)
    backbone = MaskedViT(model=spec.builder(**arch), encoder=name)
    p = backbone.patch_size
    out = backbone(torch.rand(2, 3, 4 * p, 4 * p), torch.rand(2, 16) < 0.5)
    assert out["cls"].shape == (2, 32) and out["patch"].shape == (2, 16, 32)
    out = backbone(torch.rand(2, 3, 2 * p, 2 * p))  # local crops
    assert out["patch"].shape == (2, 4, 32)
    state = backbone.model.state_dict()
    back, foreign = convert_checkpoint(spec.checkpoint_format, export_checkpoint(spec.checkpoint_format, state),
                                       backbone.model)
    assert not foreign and back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _cli(*args):
    return [sys.executable, "-m", "histoscope.cli.main", "pretrain", "dinov2", str(TINY), *args]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted single-process run (global batch 8)."""
    out = tmp_path_factory.mktemp("reference")
    result = pretrain(_recipe(data, out, *PARITY), log=None)
    return out, result


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(next((out / "export").glob("*.safetensors")))


def test_two_processes_agree_with_one(data, reference_run, tmp_path):
    out, result = reference_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 400), "-m", "histoscope.cli.main", "pretrain", "dinov2", str(TINY),
           f"data.patches=[{data / 'slides_out'}]", f"out_dir={tmp_path / 'ddp'}", "--device", "cpu", "--quiet",
           *PARITY]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _weights(out), _weights(tmp_path / "ddp")
    # iBOT's centre averages per-rank means (as DINOv2) and sums are ordered differently: not bitwise
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    log_one = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(log_one) == len(log_two) == 6
    assert log_two[0]["total_loss"] == pytest.approx(log_one[0]["total_loss"], rel=1e-5)  # centres still zero
    for a, b in zip(log_one, log_two):
        for key in ("dino_local_crops_loss", "dino_global_crops_loss"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), (key, log_one, log_two)
        # the iBOT centre is the mean of per-rank masked-token means (DINOv2), not the global mean
        assert b["ibot_loss"] == pytest.approx(a["ibot_loss"], rel=3e-2)


def test_killed_run_resumes_to_the_same_weights(data, reference_run, tmp_path):
    out, _ = reference_run
    cmd = _cli(f"data.patches=[{data / 'slides_out'}]", f"out_dir={tmp_path / 'killed'}", "--quiet", *PARITY)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 2 <= stopped_at < 6 and not (tmp_path / "killed" / "export").exists()
    resumed = subprocess.run(cmd[:-len(PARITY) - 1] + PARITY, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at + 1}" in resumed.stdout  # "resuming OUT at step k+1"
    one, again = _weights(out), _weights(tmp_path / "killed")
    for key in one:
        torch.testing.assert_close(again[key], one[key], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # lines after the checkpoint were dropped and rewritten once


def test_a_changed_recipe_does_not_resume(data, reference_run):
    out, _ = reference_run
    from histoscope.utils.recipe import ConfigError

    with pytest.raises(ConfigError, match="differs in optim.base_lr"):
        pretrain(_recipe(data, out, *PARITY, "optim.base_lr=0.5"), log=None)
