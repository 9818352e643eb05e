"""`histoscope pretrain mae`: masking and loss against a reference written here from
facebookresearch/mae's definitions, a short run that lowers the loss and exports what
`histoscope embed` loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import histoscope
import torch
from safetensors.torch import load_file

from histoscope.encoders import list_tile_encoders
from histoscope.pretrain import get_objective, load_pretrain_recipe, pretrain
from histoscope.pretrain.mae import grid_sincos, mae_loss, patchify, random_masking
from histoscope.pretrain.objective import RunInfo

RECIPES = Path(histoscope.__file__).parent / "pretrain" / "recipes"  # shipped with the package
ARCH = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32, "init_values": None}


# ---- references, one loop per definition ------------------------------------------------------

def _reference_masking(x, noise, ratio):
    """Keep the int(N (1 - ratio)) patches of smallest noise, in increasing noise order."""
    B, N, _ = x.shape
    keep = int(N * (1 - ratio))
    kept, masks = [], []
    for b in range(B):
        order = sorted(range(N), key=lambda i: float(noise[b, i]))
        kept.append(torch.stack([x[b, i] for i in order[:keep]]))
        masks.append(torch.tensor([0.0 if i in order[:keep] else 1.0 for i in range(N)]))
    return torch.stack(kept), torch.stack(masks)


def _reference_loss(pred, images, mask, p, norm):
    """Per masked patch: mean over its p*p*3 (row, col, channel) values of the squared error."""
    B, _, H, W = images.shape
    total, count = 0.0, 0
    for b in range(B):
        for r in range(H // p):
            for c in range(W // p):
                n = r * (W // p) + c
                if mask[b, n] == 0:
                    continue
                patch = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm:
                    patch = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6) ** 0.5
                total += float(((pred[b, n] - patch) ** 2).mean())
                count += 1
    return total / count


def test_random_masking_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 16, 5, generator=g), torch.rand(3, 16, generator=g)
    kept, mask, ids_restore = random_masking(x, noise, 0.75)
    ref_kept, ref_mask = _reference_masking(x, noise, 0.75)
    assert kept.shape == (3, 4, 5) and torch.equal(kept, ref_kept) and torch.equal(mask, ref_mask)
    # ids_restore puts [kept; masked] back into place
    masked = torch.stack([x[b][mask[b].bool()][torch.argsort(noise[b][mask[b].bool()])] for b in range(3)])
    back = torch.gather(torch.cat([kept, masked], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(back, x)


@pytest.mark.parametrize("norm", [False, True])
def test_loss_on_masked_patches_matches_the_reference(norm):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 24, generator=g)
    pred = torch.randn(2, 6, 8 * 8 * 3, generator=g)
    mask = (torch.rand(2, 6, generator=g) < 0.5).float()
    mask[0, 0] = 1
    loss = mae_loss(pred, patchify(images, 8), mask, norm_pix_loss=norm)
    assert float(loss) == pytest.approx(_reference_loss(pred, images, mask, 8, norm), rel=1e-5)
    # visible patches do not count: changing their prediction changes nothing
    pred2 = torch.where(mask.bool().unsqueeze(-1), pred, pred + 5)
    assert float(mae_loss(pred2, patchify(images, 8), mask, norm_pix_loss=norm)) == pytest.approx(float(loss))


def test_decoder_positions_are_maes_table():
    """MAE's get_2d_sincos_pos_embed: emb = [1d(w index), 1d(h index)], 1d = [sin, cos] of pos * omega."""
    dim, rows, cols = 8, 2, 3
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    ref = []
    for h in range(rows):
        for w in range(cols):
            ref.append(np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)]))
    np.testing.assert_allclose(grid_sincos(rows, cols, dim).numpy(), np.array(ref), rtol=1e-6, atol=1e-7)


# ---- a short run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import LocalExecutor, tile_slides

    root = tmp_path_factory.mktemp("mae")
    for stain, seed in (("he", 21), ("ihc", 22)):
        make_sample_slide(root / "slides" / f"{stain}.svs", width=3072, height=3072, mpp=0.25, seed=seed, stain=stain)
    assert tile_slides([root / "slides"], out_dir=root / "out", executor=LocalExecutor(workers=0), progress=False).ok
    return root


def _fixed_batch_loss(recipe, state=None) -> float:
    """The MAE loss of the model at its initialisation (or ``state``) on one fixed batch."""
    from histoscope.pretrain.data import StepStream, TileIndex, find_slide_tiles

    info = RunInfo(total_iters=recipe.common.total_iters, epoch_length=recipe.common.optim.epoch_length,
                   global_batch=32, device=torch.device("cpu"), seed=recipe.common.seed)
    objective = get_objective("mae").build(recipe.config, recipe.common, info)
    if state is not None:
        objective.load_state_dict(state)
    index = TileIndex(find_slide_tiles(recipe.common.data.patches, log=lambda m: None))
    stream = StepStream(index, collate=objective.collate(), global_batch=32, rank=0, world_size=1, seed=99,
                        start_step=0, stop_step=1)
    batch = next(iter(stream))
    with torch.no_grad():
        return float(objective(batch, step=0)["loss"])


def test_short_run_lowers_the_loss_and_exports_what_embed_loads(slides, tmp_path, one_torch_thread, embed_trained):
    from histoscope.encoders import load_tile_encoder

    recipe = load_pretrain_recipe("mae", RECIPES / "mae_tiny.yaml", [
        f"data.patches=[{slides / 'out'}]", f"out_dir={tmp_path / 'run'}", "optim.epochs=8", "optim.base_lr=0.03",
        "log_every=10", "tensorboard=false"])
    result = pretrain(recipe, log=None)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    before, after = _fixed_batch_loss(recipe), _fixed_batch_loss(recipe, state)
    assert after < 0.9 * before, (before, after)

    exported = result["export"]
    assert exported.name == "uni_mae.safetensors"
    note = json.loads(exported.with_suffix(".json").read_text())
    assert note["arch"] == ARCH and note["checkpoint_format"] == "timm"
    encoder = load_tile_encoder("uni", weights=exported, **ARCH)  # strict, UNI's key layout
    saved = load_file(exported)
    assert all(torch.equal(encoder.model.state_dict()[k], v) for k, v in saved.items())
    # trained from random weights: MAE's fixed sin-cos positions (class row zero), never updated
    pos = saved["pos_embed"][0]
    assert torch.equal(pos[0], torch.zeros(32)) and torch.allclose(pos[1:], grid_sincos(4, 4, 32))

    out = tmp_path / "embed"
    run = embed_trained(slides / "slides", slides / "out" / "patches", out, encoder="uni", weights=exported, arch=ARCH)
    assert run.exit_code == 0, run.output
    assert len(list((out / "features_uni").glob("*.h5"))) == 2


def test_two_processes_agree_with_one(slides, tmp_path):
    """MAE under torchrun (gloo, 2 x 8 images) follows the single-process run (16 images): masks and
    views are seeded per sample, and the masked-patch mean is the same on every rank."""
    import os
    import subprocess
    import sys

    args = [str(RECIPES / "mae_tiny.yaml"), f"data.patches=[{slides / 'out'}]", "max_steps=4", "log_every=1",
            "tensorboard=false"]
    one = pretrain(load_pretrain_recipe("mae", args[0], [*args[1:], f"out_dir={tmp_path / 'one'}"]), log=None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + os.getpid() % 90), "-m", "histoscope.cli.main", "pretrain", "mae", *args,
           f"out_dir={tmp_path / 'two'}", "--device", "cpu", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(one["export"]), load_file(tmp_path / "two" / "export" / one["export"].name)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    logs = [[json.loads(x)["mae_loss"] for x in (tmp_path / run_dir / "log.jsonl").read_text().splitlines()]
            for run_dir in ("one", "two")]
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)


@pytest.mark.parametrize("name", list_tile_encoders())
def test_every_registered_vit_trains_with_mae(name, one_torch_thread):
    """Class and register tokens, LayerScale, SwiGLU, CONCH's trunk: MAE runs on every registry ViT and
    every parameter it trains gets a gradient."""
    from histoscope.encoders import get_tile_encoder_spec
    from histoscope.pretrain.mae import MAEStudent, mae_backbone

    spec = get_tile_encoder_spec(name)
    if spec.checkpoint_format in ("ctranspath", "torchvision"):
        pytest.skip(f"{name} is not a ViT (a clear NotAViTError, tested with DINOv2)")
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    if name == "conch":
        arch.update(pool_dim=16, pool_heads=2)
    torch.manual_seed(0)
    backbone = mae_backbone(spec.builder(**arch), encoder=name, fixed_pos_embed=True)
    student = MAEStudent(backbone=backbone, mask_ratio=0.75, decoder_embed_dim=16, decoder_depth=1,
                         decoder_num_heads=2, mlp_ratio=2.0)
    p = backbone.patch_size
    images = torch.randn(2, 3, 4 * p, 4 * p)
    pred, mask = student(images, torch.rand(2, 16))
    assert pred.shape == (2, 16, p * p * 3) and mask.sum() == 2 * 12
    mae_loss(pred, patchify(images, p), mask, norm_pix_loss=True).backward()
    missing = [n for n, q in student.named_parameters() if q.requires_grad and q.grad is None]
    assert not missing, missing
