"""HIPT: region grids from coordinates (known answers), the DINO position-table
resize, the region ViT and the slide level against HIPT's own formulation, masks,
and checkpoints in the published layouts."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histoscope.slide import SlideWeightsError, load_slide_model
from histoscope.slide.models.hipt import HIPT, hipt_state_dict, load_vit4k_dino, region_grids

TILE, REGION = 256, 4096


def _tiny(in_dim: int = 8, num_outputs: int = 3, **kw) -> HIPT:
    torch.manual_seed(0)
    return load_slide_model("hipt", in_dim=in_dim, num_outputs=num_outputs, tiny=True, **kw).double().eval()


def _region_tiles(region_col: int, region_row: int, cells, in_dim: int = 8, seed: int = 0):
    """Features (n, D) and level-0 coords (n, 2) of tiles at ``cells`` (row, col) of a region."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.tensor([[region_col * REGION + c * TILE, region_row * REGION + r * TILE] for r, c in cells])
    return torch.randn(len(cells), in_dim, generator=gen, dtype=torch.float64), coords.double()


def test_region_grid_known_answer():
    features = torch.arange(6 * 3, dtype=torch.float64).view(1, 6, 3)
    coords = torch.tensor([[[0, 0],                                      # region (0, 0), cell 0
                            [2 * REGION + 3 * TILE, REGION + 5 * TILE],  # region row 1, col 2: cell 5·16 + 3
                            [2 * REGION + 3 * TILE + 40, REGION + 5 * TILE + 9],  # the same cell: averaged
                            [2 * REGION + 15 * TILE + 100, REGION + 15 * TILE + 255],  # cell 255
                            [TILE, 15 * TILE],                           # region (0, 0), cell 15·16 + 1
                            [50 * REGION, 0]]], dtype=torch.float64)     # masked: never placed
    mask = torch.tensor([[True, True, True, True, True, False]])
    grids, regions, tile_region, tile_cell = region_grids(features, coords, mask, tile_size=TILE)
    assert regions.tolist() == [[0, 0, 0], [0, 1, 2]]  # (slide, region row, region col), sorted
    assert tile_region.tolist() == [[0, 1, 1, 1, 0, -1]]
    assert tile_cell.tolist() == [[0, 83, 83, 255, 241, -1]]
    assert grids.shape == (2, 256, 3)
    torch.testing.assert_close(grids[0, 0], features[0, 0])
    torch.testing.assert_close(grids[0, 241], features[0, 4])
    torch.testing.assert_close(grids[1, 83], (features[0, 1] + features[0, 2]) / 2)
    torch.testing.assert_close(grids[1, 255], features[0, 3])
    filled = {(0, 0), (0, 241), (1, 83), (1, 255)}
    empty = [(r, c) for r in range(2) for c in range(256) if (r, c) not in filled]
    assert all(grids[r, c].abs().sum() == 0 for r, c in empty)  # missing tiles are zeros
    # the same slide at 0.5 µm/px from a 0.25 µm/px scan: coords doubled, tile_size 512
    grids2, regions2, _, tile_cell2 = region_grids(features, coords * 2, mask, tile_size=2 * TILE)
    assert regions2.tolist() == regions.tolist() and tile_cell2.tolist() == tile_cell.tolist()
    torch.testing.assert_close(grids2, grids)


def test_row_major_cells_match_hipt_unfold():
    """Our grid equals HIPT's ``x_256.unfold(1, 16, 16).transpose(1, 2)`` of the region's
    256 tiles listed row by row (tile t at row t // 16, col t % 16)."""
    cells = [(t // 16, t % 16) for t in range(256)]
    features, coords = _region_tiles(3, 7, cells, in_dim=5)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))  # input order does not matter
    grids, _, _, _ = region_grids(features[perm][None], coords[perm][None], torch.ones(1, 256, dtype=torch.bool),
                                  tile_size=TILE)
    official = features[None].unfold(1, 16, 16).transpose(1, 2)  # (1, 5, 16, 16)
    torch.testing.assert_close(grids.transpose(1, 2).reshape(1, 5, 16, 16), official)


def test_pos_embed_resize_is_dino_scale_factor():
    model = load_slide_model("hipt", in_dim=384)
    vit = model.local_vit
    assert vit.pos_embed.shape == (1, 197, 192)
    resized = vit.interpolate_pos_encoding(16, 16)
    assert resized.shape == (1, 257, 192)
    table = vit.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(table, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
    torch.testing.assert_close(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 192))
    torch.testing.assert_close(resized[:, :1], vit.pos_embed[:, :1])
    plain = F.interpolate(table, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 192)
    assert (resized[:, 1:] - plain).abs().max() > 1e-3  # the +0.1 trick samples elsewhere
    assert vit.interpolate_pos_encoding(14, 14) is vit.pos_embed


def _manual_vit4k(vit, grid):
    """vit4k_xs forward with explicit attention (HIPT's Attention/Block), for parity."""
    x = vit.phi(grid.flatten(2).transpose(1, 2))
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], 1) + vit.interpolate_pos_encoding(*grid.shape[-2:])
    for blk in vit.blocks:
        B, N, C = x.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        x = x + blk.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    return vit.norm(x)[:, 0]


def _official_hipt_lgp_fc(model: HIPT, x_256: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HIPT_LGP_FC.forward on pre-extracted regions x_256 (M, 256, D), HIPT's way: one
    slide, sequence-first transformer, A.T softmax, torch.mm."""
    h = _manual_vit4k(model.local_vit, x_256.unfold(1, 16, 16).transpose(1, 2))
    h = model.global_phi(h)
    layer = model.global_transformer.layers[0]
    official = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=h.shape[1], nhead=layer.self_attn.num_heads, dim_feedforward=h.shape[1],
                                   dropout=0.25, activation="relu"),
        num_layers=len(model.global_transformer.layers), enable_nested_tensor=False).double().eval()
    official.load_state_dict(model.global_transformer.state_dict())
    h = official(h.unsqueeze(1)).squeeze(1)
    a = model.global_attn_pool(h)  # (M, 1)
    a = F.softmax(a.T, dim=1)
    logits = model.classifier(model.global_rho(torch.mm(a, h)))
    return logits, a[0]


def test_matches_hipt_lgp_fc_formulation():
    model = _tiny()
    regions = [(0, 0), (1, 0), (5, 2)]  # (col, row)
    feats, coords = [], []
    for i, (c, r) in enumerate(regions):
        f, xy = _region_tiles(c, r, [(t // 16, t % 16) for t in range(256)], seed=i)
        feats.append(f)
        coords.append(xy)
    features, coords = torch.cat(feats)[None], torch.cat(coords)[None]
    with torch.no_grad():
        out = model(features, coords)
        # our region order is (row, col): (0,0), (0,1), (2,5)
        x_256 = torch.stack([feats[0], feats[1], feats[2]])
        logits, attention = _official_hipt_lgp_fc(model, x_256)
    # 1e-6: slide.base.masked_softmax runs in float32 even for float64 inputs
    torch.testing.assert_close(out.logits[0], logits[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.extras["region_attention"][0], attention, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores[0], attention.repeat_interleave(256), atol=1e-6, rtol=0)
    assert out.extras["region_coords"][0].tolist() == [[0, 0], [REGION, 0], [5 * REGION, 2 * REGION]]


def test_fused_vit_equals_manual_attention():
    model = _tiny()
    grid = torch.randn(3, 8, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.local_vit(grid), _manual_vit4k(model.local_vit, grid), atol=1e-10, rtol=0)


def test_masks_padding_and_partial_regions():
    """Masked tiles — even with NaN features, inside an existing region's cells or in
    a region of their own — change nothing; partial regions are zero-filled."""
    model = _tiny()
    f1, c1 = _region_tiles(0, 0, [(0, 0), (0, 1), (3, 3), (15, 15)], seed=1)
    f2, c2 = _region_tiles(2, 1, [(1, 1), (2, 2)], seed=2)
    slide_a = (torch.cat([f1, f2]), torch.cat([c1, c2]))
    slide_b = _region_tiles(9, 9, [(4, 4), (4, 5), (5, 4)], seed=3)
    n_max = 9
    features = torch.full((2, n_max, 8), float("nan"), dtype=torch.float64)
    coords = torch.zeros(2, n_max, 2, dtype=torch.float64)
    coords[:, 6:] = torch.tensor([3 * REGION, 4 * REGION], dtype=torch.float64)  # a region of padding
    coords[1, 3:6] = c1[:3]  # padding on top of slide A's cells
    mask = torch.zeros(2, n_max, dtype=torch.bool)
    for b, (f, c) in enumerate([slide_a, slide_b]):
        features[b, :len(f)], coords[b, :len(c)], mask[b, :len(f)] = f, c, True
    with torch.no_grad():
        out = model(features, coords, mask)
        assert torch.isfinite(out.logits).all()
        assert (out.scores[~mask] == 0).all()
        assert out.extras["region_mask"].tolist() == [[True, True], [True, False]]
        torch.testing.assert_close(out.extras["region_attention"].sum(1), torch.ones(2, dtype=torch.float64))
        for b, (f, c) in enumerate([slide_a, slide_b]):
            alone = model(f[None], c[None])
            torch.testing.assert_close(out.logits[b], alone.logits[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(out.scores[b, :len(f)], alone.scores[0], atol=1e-12, rtol=0)


def _hipt_layout(n_classes: int) -> dict[str, tuple[int, ...]]:
    """HIPT_LGP_FC(size_arg="small") state_dict (spec §2.1, §2.3)."""
    keys = {"local_vit.cls_token": (1, 1, 192), "local_vit.pos_embed": (1, 197, 192),
            "local_vit.phi.0.weight": (192, 384), "local_vit.phi.0.bias": (192,)}
    for i in range(6):
        p = f"local_vit.blocks.{i}."
        keys |= {p + "norm1.weight": (192,), p + "norm1.bias": (192,), p + "attn.qkv.weight": (576, 192),
                 p + "attn.qkv.bias": (576,), p + "attn.proj.weight": (192, 192), p + "attn.proj.bias": (192,),
                 p + "norm2.weight": (192,), p + "norm2.bias": (192,), p + "mlp.fc1.weight": (768, 192),
                 p + "mlp.fc1.bias": (768,), p + "mlp.fc2.weight": (192, 768), p + "mlp.fc2.bias": (192,)}
    keys |= {"local_vit.norm.weight": (192,), "local_vit.norm.bias": (192,),
             "global_phi.0.weight": (192, 192), "global_phi.0.bias": (192,)}
    for i in range(2):
        p = f"global_transformer.layers.{i}."
        keys |= {p + "self_attn.in_proj_weight": (576, 192), p + "self_attn.in_proj_bias": (576,),
                 p + "self_attn.out_proj.weight": (192, 192), p + "self_attn.out_proj.bias": (192,),
                 p + "linear1.weight": (192, 192), p + "linear1.bias": (192,),
                 p + "linear2.weight": (192, 192), p + "linear2.bias": (192,),
                 p + "norm1.weight": (192,), p + "norm1.bias": (192,),
                 p + "norm2.weight": (192,), p + "norm2.bias": (192,)}
    keys |= {"global_attn_pool.attention_a.0.weight": (192, 192), "global_attn_pool.attention_a.0.bias": (192,),
             "global_attn_pool.attention_b.0.weight": (192, 192), "global_attn_pool.attention_b.0.bias": (192,),
             "global_attn_pool.attention_c.weight": (1, 192), "global_attn_pool.attention_c.bias": (1,),
             "global_rho.0.weight": (192, 192), "global_rho.0.bias": (192,),
             "classifier.weight": (n_classes, 192), "classifier.bias": (n_classes,)}
    return keys


def test_published_key_layout():
    model = load_slide_model("hipt", in_dim=384, num_outputs=4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _hipt_layout(4)
    assert sum(p.numel() for p in model.local_vit.parameters()) == 2_781_504
    assert len(model.local_vit.state_dict()) == 78
    assert model.local_vit.norm.eps == 1e-6 and model.global_transformer.layers[0].norm1.eps == 1e-5
    assert not model.global_transformer.layers[0].norm_first  # post-LN


def _dino_checkpoint(vit, *, out_dim: int = 16) -> dict:
    """What DINO-4K's main_dino4k.py saves (spec §2.4): teacher = backbone + DINOHead."""
    backbone = {f"backbone.{k}": v.clone() for k, v in vit.state_dict().items()}
    head = {"head.mlp.0.weight": torch.randn(32, 192), "head.mlp.0.bias": torch.randn(32),
            "head.mlp.2.weight": torch.randn(32, 32), "head.mlp.2.bias": torch.randn(32),
            "head.mlp.4.weight": torch.randn(8, 32), "head.mlp.4.bias": torch.randn(8),
            "head.last_layer.weight_g": torch.ones(out_dim, 1), "head.last_layer.weight_v": torch.randn(out_dim, 8)}
    return {"teacher": backbone | head, "student": {f"module.{k}": v for k, v in (backbone | head).items()},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": argparse.Namespace(arch="vit4k_xs", out_dim=out_dim),
            "dino_loss": {"center": torch.zeros(1, out_dim)}}


def test_dino_teacher_checkpoint_loads_strictly_into_local_vit(tmp_path):
    torch.manual_seed(1)
    pretrained = load_slide_model("hipt", in_dim=384).local_vit
    path = tmp_path / "vit4k_xs_dino.pth"
    torch.save(_dino_checkpoint(pretrained), path)

    model = load_slide_model("hipt", in_dim=384, num_outputs=2)
    load_vit4k_dino(model, path)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(model.local_vit.state_dict()[key], value), key

    broken = _dino_checkpoint(pretrained)
    del broken["teacher"]["backbone.blocks.5.mlp.fc2.bias"]
    torch.save(broken, path)
    with pytest.raises(SlideWeightsError, match=r"1 missing keys \['blocks.5.mlp.fc2.bias'\]"):
        load_vit4k_dino(model, path)
    with pytest.raises(SlideWeightsError, match="load_vit4k_dino"):
        hipt_state_dict(broken)  # what load_slide_model("hipt", weights=...) would be handed


def test_finetuned_checkpoint_with_dataparallel_local_vit_loads(tmp_path):
    """HIPT's relocate() wraps local_vit in DataParallel: keys local_vit.module.*."""
    source = _tiny()
    state = {k.replace("local_vit.", "local_vit.module.", 1): v for k, v in source.state_dict().items()}
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(state, path)
    loaded = load_slide_model("hipt", in_dim=8, num_outputs=3, tiny=True, weights=path).double().eval()
    features, coords = _region_tiles(1, 1, [(0, 0), (7, 3)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(features[None], coords[None]).logits,
                                   source(features[None], coords[None]).logits)
    assert torch.equal(loaded.local_vit.pos_embed, source.local_vit.pos_embed)
