"""Tile encoders: the registry against the published facts, the preprocessing against
torchvision, and strict loading of every family from a checkpoint written in the
authors' own key layout, compared with the reference model built the reference way.

Models are tiny variants (depth 2, width 32-48) of the real architectures, built
through the same registry path with ``**arch`` overrides; the Hugging Face Hub is
always offline, served from a temporary cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pathlib
import shutil
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from histoscope.encoders import (
    CorruptWeightsError,
    Preprocess,
    TileEncoder,
    UnknownTileEncoderError,
    WeightsAccessError,
    WeightsMismatchError,
    WeightsNotFoundError,
    get_tile_encoder_spec,
    list_tile_encoders,
    load_tile_encoder,
    preprocess_tiles,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

# Published facts (notes/encoders_spec.md, section 0):
# name: (embed dim, (resize, crop, interpolation), (mean, std), hf repo, gated, checkpoint layout, native mpp)
PUBLISHED = {
    "uni": (1024, (224, 224, "bilinear"), IMAGENET, "MahmoodLab/UNI", True, "timm", 0.5),
    "uni2_h": (1536, (224, 224, "bilinear"), IMAGENET, "MahmoodLab/UNI2-h", True, "timm", 0.5),
    "gigapath": (1536, (256, 224, "bicubic"), IMAGENET, "prov-gigapath/prov-gigapath", True, "timm", 0.5),
    "virchow": (2560, (224, 224, "bicubic"), IMAGENET, "paige-ai/Virchow", True, "timm", 0.5),
    "virchow2": (2560, (224, 224, "bicubic"), IMAGENET, "paige-ai/Virchow2", True, "timm", 0.5),
    "hoptimus0": (1536, (224, 224, "bilinear"), HOPTIMUS, "bioptimus/H-optimus-0", True, "timm", 0.5),
    "hoptimus1": (1536, (224, 224, "bilinear"), HOPTIMUS, "bioptimus/H-optimus-1", True, "timm", 0.5),
    "phikon": (768, (224, 224, "bilinear"), IMAGENET, "owkin/phikon", False, "hf_vit", 0.5),
    "phikon_v2": (1024, (224, 224, "bilinear"), IMAGENET, "owkin/phikon-v2", False, "hf_dinov2", 0.5),
    "ctranspath": (768, (224, None, "bilinear"), IMAGENET, None, False, "ctranspath", 1.0),
    "conch": (512, (448, 448, "bicubic"), OPENAI_CLIP, "MahmoodLab/CONCH", True, "conch", 0.5),
    "resnet50_trunc": (1024, (224, 224, "bilinear"), IMAGENET, "timm/resnet50.tv_in1k", False, "torchvision", 0.5),
}

# Full-size architectures (spec: tensor counts, shapes, parameter counts in millions), checked on `meta`
FULL_SIZE = {
    "uni": (342, 303.4, {"pos_embed": (1, 197, 1024), "blocks.0.attn.qkv.weight": (3072, 1024),
                         "blocks.0.ls1.gamma": (1024,), "blocks.0.mlp.fc1.weight": (4096, 1024)}),
    "uni2_h": (343, 681.4, {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536),
                            "patch_embed.proj.weight": (1536, 3, 14, 14), "blocks.0.attn.qkv.weight": (4608, 1536),
                            "blocks.0.mlp.fc1.weight": (8192, 1536), "blocks.0.mlp.fc2.weight": (1536, 4096)}),
    "gigapath": (566, 1135.0, {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                               "blocks.39.mlp.fc1.weight": (8192, 1536), "blocks.39.mlp.fc2.weight": (1536, 4096)}),
    "virchow": (454, 631.2, {"pos_embed": (1, 257, 1280), "patch_embed.proj.weight": (1280, 3, 14, 14),
                             "blocks.31.mlp.fc1.weight": (6832, 1280), "blocks.31.mlp.fc2.weight": (1280, 3416)}),
    "virchow2": (455, 631.2, {"reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280)}),
    "hoptimus0": (567, 1134.8, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536),
                                "blocks.39.mlp.fc1.weight": (8192, 1536), "blocks.39.ls2.gamma": (1536,)}),
    "hoptimus1": (567, 1134.8, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536)}),
    "phikon": (150, 85.8, {"pos_embed": (1, 197, 768), "blocks.11.attn.qkv.weight": (2304, 768)}),
    "phikon_v2": (342, 303.4, {"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,)}),
    "ctranspath": (183, 27.5, {"patch_embed.proj.0.weight": (12, 3, 3, 3), "patch_embed.proj.3.weight": (24, 12, 3, 3),
                               "patch_embed.proj.6.weight": (96, 24, 1, 1), "patch_embed.norm.weight": (96,),
                               "layers.0.blocks.0.attn.relative_position_bias_table": (169, 3),
                               "layers.1.downsample.reduction.weight": (192, 384), "norm.weight": (768,)}),
    "conch": (164, 87.8, {"trunk.pos_embed": (1, 785, 768), "attn_pool_contrast.query": (1, 512),
                          "attn_pool_contrast.attn.q_proj_weight": (512, 512),
                          "attn_pool_contrast.attn.k_proj_weight": (512, 768),
                          "attn_pool_contrast.attn.v_proj_weight": (512, 768),
                          "attn_pool_contrast.attn.in_proj_bias": (1536,), "ln_contrast.weight": (512,),
                          "proj_contrast": (512, 512)}),
    "resnet50_trunc": (258, 8.5, {"conv1.weight": (64, 3, 7, 7), "layer3.5.bn3.weight": (1024,)}),
}

TINY_VIT = dict(depth=2, embed_dim=48, num_heads=2)
TINY = {name: TINY_VIT for name in PUBLISHED}
TINY["conch"] = dict(TINY_VIT, pool_dim=32, pool_heads=2)
TINY["ctranspath"] = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
TINY["resnet50_trunc"] = dict(layers=(1, 1, 1, 1))


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache for every test: nothing here may touch the network."""
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time, so the environment alone is too late
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hub_cache(cache, repo, files, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``files`` ({name: source path}) out as huggingface_hub's cache does."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def images():
    """Two normalised 224-px images (B, 3, H, W)."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def randn(*shape, scale=1.0, seed=[0]):
    seed[0] += 1
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def randomise_batchnorm_stats(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(randn(m.num_features, scale=0.1))
            m.running_var.copy_(randn(m.num_features).abs() + 0.5)


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_exactly_the_published_encoders():
    assert list_tile_encoders() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_spec_matches_published_table(name):
    embed_dim, (resize, crop, interpolation), (mean, std), repo, gated, layout, mpp = PUBLISHED[name]
    spec = get_tile_encoder_spec(name)
    assert spec.name == name
    assert spec.embed_dim == embed_dim
    assert spec.preprocess == Preprocess(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std)
    assert (spec.hf_repo, spec.gated, spec.checkpoint_format, spec.native_mpp) == (repo, gated, layout, mpp)
    assert spec.license and spec.description and spec.pooling.description


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_architecture_matches_published_shapes(name):
    n_tensors, million_params, shapes = FULL_SIZE[name]
    spec = get_tile_encoder_spec(name)
    with torch.device("meta"):  # shapes only
        encoder = TileEncoder(spec=spec, model=spec.builder())
        size = spec.preprocess.crop or spec.preprocess.resize
        out = encoder(torch.empty(2, 3, size, size))
    state = encoder.model.state_dict()
    assert len(state) == n_tensors
    assert round(sum(p.numel() for p in encoder.model.parameters()) / 1e6, 1) == million_params
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert encoder.embed_dim == spec.embed_dim and tuple(out.shape) == (2, spec.embed_dim)


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownTileEncoderError, match=r"'virchow2'.*timm:<model_name>"):
        get_tile_encoder_spec("virchw2")


def test_register_rejects_duplicates():
    from histoscope.encoders import register

    with pytest.raises(ValueError, match="already registered"):
        register(get_tile_encoder_spec("uni"))


# --------------------------------------------------------------------------------------------
# Preprocessing


def torchvision_reference(tile, *, resize, crop, interpolation, mean, std):
    img = torch.from_numpy(tile).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    img = TF.resize(img, [resize], interpolation=InterpolationMode(interpolation), antialias=True)
    if crop is not None:
        img = TF.center_crop(img, [crop])
    img = TF.to_dtype(img, torch.float32, scale=True)
    return TF.normalize(img, list(mean), list(std))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height,width", [(256, 256), (300, 261), (224, 224), (230, 500), (512, 512)])
@pytest.mark.parametrize("crop", [224, None])
def test_preprocess_matches_torchvision(interpolation, height, width, crop):
    tiles = np.random.default_rng(height + width).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    pre = Preprocess(resize=224, crop=crop, interpolation=interpolation, mean=IMAGENET[0], std=IMAGENET[1])
    ours = preprocess_tiles(tiles, pre)
    ref = torch.stack([torchvision_reference(t, resize=224, crop=crop, interpolation=interpolation,
                                             mean=IMAGENET[0], std=IMAGENET[1]) for t in tiles])
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5


def test_preprocess_accepts_numpy_torch_and_single_tiles():
    tiles = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    pre = get_tile_encoder_spec("gigapath").preprocess
    batch = preprocess_tiles(tiles, pre)
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(preprocess_tiles(torch.from_numpy(tiles), pre), batch)
    assert torch.equal(preprocess_tiles(tiles[0], pre), batch[:1])
    with pytest.raises(TypeError, match="uint8"):
        preprocess_tiles(tiles.astype(np.float32), pre)


def test_encoder_transform_uses_the_published_preprocessing():
    tiles = np.random.default_rng(1).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    encoder = load_tile_encoder("conch", weights="random", **TINY["conch"])
    ref = torch.stack([torchvision_reference(t, resize=448, crop=448, interpolation="bicubic",
                                             mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1]) for t in tiles])
    assert (encoder.transform(tiles) - ref).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------
# timm families: the checkpoint is the reference model's own state dict

OFFICIAL_TIMM = {  # the authors' calls (model cards, READMEs, TRIDENT for local files)
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                          dynamic_img_size=True)),
    "uni2_h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                                             no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
                                             reg_tokens=8, dynamic_img_size=True)),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                                  num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                             global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                                             act_layer=nn.SiLU)),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                              global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                                              act_layer=nn.SiLU, reg_tokens=4)),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", dict(init_values=1e-5, dynamic_img_size=False, num_classes=0,
                                                        img_size=224)),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", dict(init_values=1e-5, dynamic_img_size=False, num_classes=0,
                                                        img_size=224)),
}


def published_embedding(name, output):
    """The model cards' pooling, written out literally."""
    if name == "virchow":
        return torch.cat([output[:, 0], output[:, 1:].mean(1)], dim=-1)
    if name == "virchow2":  # "tokens 1-4 are register tokens so we ignore those"
        return torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)
    return output


def official_timm_reference(name):
    torch.manual_seed(1)
    architecture, kwargs = OFFICIAL_TIMM[name]
    return timm.create_model(architecture, pretrained=False, **{**kwargs, **TINY_VIT}).eval()


@pytest.mark.parametrize("name", sorted(OFFICIAL_TIMM))
def test_timm_family_loads_official_checkpoint(name, tmp_path, images):
    ref = official_timm_reference(name)
    path = tmp_path / ("model.safetensors" if name.startswith("hoptimus") else "pytorch_model.bin")
    if path.suffix == ".safetensors":
        save_file(ref.state_dict(), path)
    else:
        torch.save(ref.state_dict(), path)
    encoder = load_tile_encoder(name, weights=path, **TINY_VIT)
    assert not encoder.training and encoder.weights_path == path
    assert encoder.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        expected = published_embedding(name, ref(images))
        got = encoder(images)
    assert got.shape == (2, encoder.embed_dim) == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_checkpoint_containers_and_wrapper_prefixes_are_unwrapped(tmp_path, images):
    ref = official_timm_reference("uni")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}}, path)
    encoder = load_tile_encoder("uni", weights=f"file:{path}", **TINY_VIT)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), ref(images), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Phikon / Phikon-v2: HF transformers layouts, checked against an independent HF-style forward

HF_NAMES = {  # per-layer names in transformers' ViTModel and Dinov2Model
    "vit": dict(ln1="layernorm_before", ln2="layernorm_after", fc1="intermediate.dense", fc2="output.dense"),
    "dinov2": dict(ln1="norm1", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2"),
}


def hf_state_dict(kind, *, dim=48, depth=2, patch=16, img=224, embed_scale=1.0):
    """Random weights under transformers' key names (ViTModel with its pooler; Dinov2Model with mask_token)."""
    names, tokens = HF_NAMES[kind], (img // patch) ** 2 + 1
    sd = {
        "embeddings.cls_token": randn(1, 1, dim, scale=embed_scale),
        "embeddings.position_embeddings": randn(1, tokens, dim, scale=embed_scale),
        "embeddings.patch_embeddings.projection.weight": randn(dim, 3, patch, patch, scale=embed_scale / patch),
        "embeddings.patch_embeddings.projection.bias": randn(dim, scale=embed_scale),
        "layernorm.weight": 1 + randn(dim, scale=0.1), "layernorm.bias": randn(dim, scale=0.1),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{names[ln]}.weight"] = 1 + randn(dim, scale=0.1)
            sd[f"{p}{names[ln]}.bias"] = randn(dim, scale=0.1)
        for proj in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            sd[f"{p}{proj}.weight"] = randn(dim, dim, scale=dim**-0.5)
            sd[f"{p}{proj}.bias"] = randn(dim, scale=0.1)
        sd[f"{p}{names['fc1']}.weight"] = randn(4 * dim, dim, scale=dim**-0.5)
        sd[f"{p}{names['fc1']}.bias"] = randn(4 * dim, scale=0.1)
        sd[f"{p}{names['fc2']}.weight"] = randn(dim, 4 * dim, scale=(4 * dim) ** -0.5)
        sd[f"{p}{names['fc2']}.bias"] = randn(dim, scale=0.1)
        if kind == "dinov2":
            sd[f"{p}layer_scale1.lambda1"] = randn(dim, scale=0.5)
            sd[f"{p}layer_scale2.lambda1"] = randn(dim, scale=0.5)
    if kind == "vit":
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = randn(dim, dim), randn(dim)
    else:
        sd["embeddings.mask_token"] = randn(1, dim)
    return sd


def hf_last_hidden_cls(kind, sd, x, *, heads=2, eps, patch=16):
    """``last_hidden_state[:, 0]`` of transformers' ViTModel / Dinov2Model, written out by hand."""
    names = HF_NAMES[kind]
    dim = sd["embeddings.cls_token"].shape[-1]
    emb = F.conv2d(x, sd["embeddings.patch_embeddings.projection.weight"],
                   sd["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([sd["embeddings.cls_token"].expand(len(x), -1, -1), emb], 1) + sd["embeddings.position_embeddings"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})

    def linear(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(t, name):
        return F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    for i in range(depth):
        p = f"encoder.layer.{i}."
        a = norm(h, p + names["ln1"])
        q, k, v = (linear(a, f"{p}attention.attention.{n}").unflatten(-1, (heads, -1)).transpose(1, 2)
                   for n in ("query", "key", "value"))  # (B, heads, T, dim/heads)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
        attn = linear((weights @ v).transpose(1, 2).flatten(2), f"{p}attention.output.dense")
        h = h + (sd[f"{p}layer_scale1.lambda1"] * attn if kind == "dinov2" else attn)
        mlp = linear(F.gelu(linear(norm(h, p + names["ln2"]), p + names["fc1"])), p + names["fc2"])
        h = h + (sd[f"{p}layer_scale2.lambda1"] * mlp if kind == "dinov2" else mlp)
    return norm(h, "layernorm")[:, 0]


@pytest.mark.parametrize("name,kind,eps", [("phikon", "vit", 1e-12), ("phikon_v2", "dinov2", 1e-6)])
def test_phikon_loads_hf_checkpoint(name, kind, eps, tmp_path, images):
    # tiny embeddings make LayerNorm's eps matter, so a wrong eps cannot pass unnoticed
    sd = hf_state_dict(kind, embed_scale=1e-4)
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    encoder = load_tile_encoder(name, weights=tmp_path, **TINY_VIT)  # a snapshot folder
    assert encoder.weights_path == path
    with torch.no_grad():
        expected = hf_last_hidden_cls(kind, sd, images, eps=eps)
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-5)
        wrong_eps = 1e-6 if eps == 1e-12 else 1e-12
        wrong = load_tile_encoder(name, weights=path, norm_layer=partial(nn.LayerNorm, eps=wrong_eps), **TINY_VIT)
        assert (wrong(images) - expected).abs().max() > 1e-2


def test_phikon_v2_rejects_a_timm_layout_file_of_the_same_architecture(tmp_path):
    path = tmp_path / "model.safetensors"  # UNI is ViT-L/16 with LayerScale too: only the layout tells them apart
    save_file(official_timm_reference("uni").state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"layout 'hf_dinov2'(.|\n)*34 unexpected keys") as err:
        load_tile_encoder("phikon_v2", weights=path, **TINY_VIT)
    assert "Is this a checkpoint for 'uni'?" in str(err.value)


def test_phikon_rejects_incomplete_attention(tmp_path):
    sd = hf_state_dict("vit")
    del sd["encoder.layer.1.attention.attention.key.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsMismatchError, match=r"blocks\.1\.attn\.qkv\.weight") as err:
        load_tile_encoder("phikon", weights=tmp_path / "pytorch_model.bin", **TINY_VIT)
    assert "encoder.layer.1.attention.attention.query.weight" in str(err.value)


# --------------------------------------------------------------------------------------------
# CTransPath: timm 0.5.4 layout inside {"model": ...}


class ReferenceConvStem(nn.Module):
    """TransPath's ConvStem (conv3x3/2-BN-ReLU twice, conv1x1, LayerNorm), emitting NHWC for timm >= 0.9."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **kwargs):
        super().__init__()
        self.img_size, self.patch_size = tuple(img_size), (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        c = embed_dim // 8
        self.proj = nn.Sequential(nn.Conv2d(in_chans, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                  nn.Conv2d(2 * c, embed_dim, 1))
        self.norm = norm_layer(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def relative_position_index(window):
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (window², window²)


def to_timm054_swin_layout(model):
    """A timm >= 0.9 Swin state dict rewritten as timm 0.5.4 saved it (CTransPath's ``model`` entry)."""
    old = {}
    for key, value in model.state_dict().items():
        if ".downsample." in key:  # 0.5.4 merges patches at the end of the previous stage
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        old[key] = value
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            window = block.window_size[0]
            old[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = relative_position_index(window)
            if block.attn_mask is not None:  # persistent buffers in 0.5.4
                old[f"layers.{s}.blocks.{b}.attn_mask"] = block.attn_mask.clone()
    return old


def test_ctranspath_loads_official_checkpoint(tmp_path, images):
    torch.manual_seed(2)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ReferenceConvStem,
                            **TINY["ctranspath"])
    ref.head = nn.Identity()  # as in the authors' feature extraction
    randomise_batchnorm_stats(ref)
    ref.eval()
    old = to_timm054_swin_layout(ref)
    assert "layers.0.downsample.reduction.weight" in old and "layers.3.downsample.reduction.weight" not in old
    assert "layers.0.blocks.1.attn_mask" in old and "layers.2.blocks.1.attn_mask" in old
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": old}, path)
    encoder = load_tile_encoder("ctranspath", weights=path, **TINY["ctranspath"])
    with torch.no_grad():
        # timm 0.5.4: final norm, then average over tokens; current timm's forward_features is (B, h, w, C)
        torch.testing.assert_close(encoder(images), ref.forward_features(images).mean(dim=(1, 2)), atol=1e-6, rtol=0)
        # the stem alone, computed from the checkpoint tensors
        w = {k.removeprefix("patch_embed."): v for k, v in old.items() if k.startswith("patch_embed.")}
        bn = lambda t, i: F.batch_norm(t, w[f"proj.{i}.running_mean"], w[f"proj.{i}.running_var"],  # noqa: E731
                                       w[f"proj.{i}.weight"], w[f"proj.{i}.bias"])
        t = F.relu(bn(F.conv2d(images, w["proj.0.weight"], stride=2, padding=1), 1))
        t = F.relu(bn(F.conv2d(t, w["proj.3.weight"], stride=2, padding=1), 4))
        t = F.conv2d(t, w["proj.6.weight"], w["proj.6.bias"]).permute(0, 2, 3, 1)
        t = F.layer_norm(t, (32,), w["norm.weight"], w["norm.bias"])
        torch.testing.assert_close(encoder.model.patch_embed(images), t, atol=1e-5, rtol=0)


def test_ctranspath_without_weights_says_where_to_get_them():
    with pytest.raises(WeightsNotFoundError, match=r"not on the Hugging Face Hub.*TransPath.*weights=PATH"):
        load_tile_encoder("ctranspath", **TINY["ctranspath"])


# --------------------------------------------------------------------------------------------
# CONCH: CoCa checkpoint (visual.* + text.*), attentional pooling checked by hand


def conch_checkpoint(trunk, *, dim=32, heads_caption=2):
    width = trunk.embed_dim
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    pool = {
        "query": randn(1, dim), "attn.q_proj_weight": randn(dim, dim, scale=dim**-0.5),
        "attn.k_proj_weight": randn(dim, width, scale=width**-0.5),
        "attn.v_proj_weight": randn(dim, width, scale=width**-0.5), "attn.in_proj_bias": randn(3 * dim, scale=0.1),
        "attn.out_proj.weight": randn(dim, dim, scale=dim**-0.5), "attn.out_proj.bias": randn(dim, scale=0.1),
        "ln_q.weight": 1 + randn(dim, scale=0.1), "ln_q.bias": randn(dim, scale=0.1),
        "ln_k.weight": 1 + randn(width, scale=0.1), "ln_k.bias": randn(width, scale=0.1),
    }
    sd.update({f"visual.attn_pool_contrast.{k}": v for k, v in pool.items()})
    sd.update({"visual.ln_contrast.weight": 1 + randn(dim, scale=0.1), "visual.ln_contrast.bias": randn(dim),
               "visual.proj_contrast": randn(dim, dim)})
    caption = {"query": randn(4, width), "attn.in_proj_weight": randn(3 * width, width),
               "attn.in_proj_bias": randn(3 * width), "attn.out_proj.weight": randn(width, width),
               "attn.out_proj.bias": randn(width), "ln_q.weight": randn(width), "ln_q.bias": randn(width),
               "ln_k.weight": randn(width), "ln_k.bias": randn(width)}
    sd.update({f"visual.attn_pool_caption.{k}": v for k, v in caption.items()})
    sd.update({"visual.ln_caption.weight": randn(width), "visual.ln_caption.bias": randn(width)})
    sd.update({"text.token_embedding.weight": randn(16, 8), "text.positional_embedding": randn(6, 8),
               "text.ln_final.weight": randn(8), "text.text_projection": randn(8, dim), "logit_scale": randn(())})
    return sd, pool


def conch_reference(trunk, sd, pool, x, *, heads=2):
    """``encode_image(x, proj_contrast=False, normalize=False)``: trunk tokens, one-query attention, LayerNorm."""
    tokens = trunk.forward_features(x)  # CONCH replaces trunk.forward by forward_features
    dim, width = pool["query"].shape[-1], tokens.shape[-1]
    ctx = F.layer_norm(tokens, (width,), pool["ln_k.weight"], pool["ln_k.bias"])
    q = F.layer_norm(pool["query"], (dim,), pool["ln_q.weight"], pool["ln_q.bias"])
    bq, bk, bv = pool["attn.in_proj_bias"].chunk(3)
    q = (q @ pool["attn.q_proj_weight"].T + bq).unflatten(-1, (heads, -1)).transpose(0, 1)  # (heads, 1, d)
    k = (ctx @ pool["attn.k_proj_weight"].T + bk).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, T, d)
    v = (ctx @ pool["attn.v_proj_weight"].T + bv).unflatten(-1, (heads, -1)).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)  # (B, heads, 1, T)
    pooled = (weights @ v).transpose(1, 2).flatten(2)[:, 0]  # (B, dim)
    pooled = pooled @ pool["attn.out_proj.weight"].T + pool["attn.out_proj.bias"]
    return F.layer_norm(pooled, (dim,), sd["visual.ln_contrast.weight"], sd["visual.ln_contrast.bias"])


def conch_trunk():
    torch.manual_seed(3)  # CONCH's _build_vision_tower, with the tiny width/depth
    return VisionTransformer(embed_dim=48, depth=2, num_heads=2, mlp_ratio=4, img_size=448, patch_size=16,
                             num_classes=0, dynamic_img_size=True).eval()


def test_conch_loads_official_checkpoint_and_ignores_text(tmp_path):
    trunk = conch_trunk()
    sd, pool = conch_checkpoint(trunk)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    encoder = load_tile_encoder("conch", weights=path, **TINY["conch"])
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = encoder(x)
        torch.testing.assert_close(got, conch_reference(trunk, sd, pool, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoder.model.project(got), got @ sd["visual.proj_contrast"])
    assert got.shape == (2, 32) and encoder.embed_dim == 32


def test_conch_rejects_unknown_non_text_keys(tmp_path):
    sd, _ = conch_checkpoint(conch_trunk())
    sd["visual.head.proj.weight"] = randn(4, 4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsMismatchError, match=r"1 unexpected keys: head\.proj\.weight"):
        load_tile_encoder("conch", weights=tmp_path / "pytorch_model.bin", **TINY["conch"])


# --------------------------------------------------------------------------------------------
# CLAM's truncated ResNet-50: a full torchvision checkpoint


def torchvision_resnet():
    torch.manual_seed(5)
    model = ResNet(Bottleneck, [1, 1, 1, 1])  # torchvision's resnet50 with one block per stage
    randomise_batchnorm_stats(model)
    return model.eval()


def test_resnet50_trunc_loads_full_torchvision_checkpoint(tmp_path, images):
    ref = torchvision_resnet()
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    encoder = load_tile_encoder("resnet50_trunc", weights=path, **TINY["resnet50_trunc"])
    with torch.no_grad():
        t = ref.maxpool(ref.relu(ref.bn1(ref.conv1(images))))
        expected = ref.layer3(ref.layer2(ref.layer1(t))).mean(dim=(2, 3))  # (B, 1024)
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=1e-5)
    assert encoder.embed_dim == 1024


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.update({"layer3.0.extra.weight": torch.zeros(1)}), r"1 unexpected keys: layer3\.0\.extra\.weight"),
    (lambda sd: sd.pop("layer3.0.conv1.weight"), r"1 missing keys: layer3\.0\.conv1\.weight"),
    (lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), r"conv1\.weight \(checkpoint \(64, 3, 3, 3\)"),
])
def test_resnet50_trunc_drops_only_layer4_and_fc(change, message, tmp_path):
    sd = torchvision_resnet().state_dict()
    change(sd)
    torch.save(sd, tmp_path / "resnet50.pth")
    with pytest.raises(WeightsMismatchError, match=message):
        load_tile_encoder("resnet50_trunc", weights=tmp_path / "resnet50.pth", **TINY["resnet50_trunc"])


# --------------------------------------------------------------------------------------------
# Generic timm models and timm Hub repos


def test_timm_model_with_users_checkpoint(tmp_path, images):
    torch.manual_seed(6)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_VIT).eval()  # with its 1000-way head
    path = tmp_path / "my.pth"
    torch.save(ref.state_dict(), path)
    encoder = load_tile_encoder("timm:vit_small_patch16_224", weights=f"file:{path}", **TINY_VIT)
    spec = encoder.spec
    assert spec.preprocess == Preprocess(resize=248, crop=224, interpolation="bicubic", mean=(0.5,) * 3,
                                         std=(0.5,) * 3)  # timm: floor(224 / crop_pct 0.9)
    assert spec.hf_repo == "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(images), pre_logits=True)
        torch.testing.assert_close(encoder(images), expected, atol=1e-6, rtol=0)


def test_unknown_timm_model_suggests_names():
    with pytest.raises(UnknownTileEncoderError, match="vit_small_patch16_224"):
        get_tile_encoder_spec("timm:vit_smal_patch16_224")


HUB_CONFIG = {
    "architecture": "vit_small_patch16_224", "num_classes": 0, "num_features": 48,
    "model_args": {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 224, "num_classes": 0},
    "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 1.0,
                       "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "num_classes": 0, "license": "mit"},
}


def hub_repo_files(tmp_path):
    torch.manual_seed(7)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).eval()
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG))
    save_file(ref.state_dict(), folder / "model.safetensors")
    return ref, folder


def test_hf_hub_repo_from_the_cache(tmp_path, hub_cache, images):
    ref, folder = hub_repo_files(tmp_path)
    put_in_hub_cache(hub_cache, "histoscope-test/tiny-vit",
                     {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    encoder = load_tile_encoder("hf-hub:histoscope-test/tiny-vit")
    assert encoder.spec.preprocess == Preprocess(resize=224, crop=224, interpolation="bilinear",
                                                 mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert encoder.spec.license == "mit" and encoder.embed_dim == 48
    assert str(encoder.weights_path).startswith(str(hub_cache))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), ref(images), atol=1e-6, rtol=0)
    alias = load_tile_encoder("hf_hub:histoscope-test/tiny-vit")  # Prov-GigaPath's spelling
    assert (alias.spec.hf_repo, alias.weights_sha256) == ("histoscope-test/tiny-vit", encoder.weights_sha256)


def test_hf_hub_repo_from_a_local_snapshot_folder(tmp_path, images):
    ref, folder = hub_repo_files(tmp_path)  # the cache stays empty
    encoder = load_tile_encoder("hf-hub:histoscope-test/tiny-vit", weights=folder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), ref(images), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Weights from the Hugging Face cache, and the errors people will see


def test_registered_encoder_downloads_through_the_hub_cache(tmp_path, hub_cache, images):
    ref = official_timm_reference("uni")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    snapshot = put_in_hub_cache(hub_cache, "MahmoodLab/UNI", {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    encoder = load_tile_encoder("uni", weights=None, **TINY_VIT)
    assert encoder.weights_path == snapshot / "pytorch_model.bin"
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), ref(images), atol=1e-6, rtol=0)


def test_empty_offline_cache_explains_gating_and_the_fixes():
    with pytest.raises(WeightsAccessError) as err:
        load_tile_encoder("uni", **TINY_VIT)
    message = str(err.value)
    for needle in ("'uni'", "MahmoodLab/UNI", "gated", "HF_HUB_OFFLINE", "huggingface-cli login", "HF_TOKEN",
                   "--weights PATH"):
        assert needle in message


def test_random_weights_only_when_asked():
    encoder = load_tile_encoder("uni", weights="random", dtype=torch.bfloat16, **TINY_VIT)
    assert encoder.weights_path is None and encoder.weights_sha256 is None
    assert "weights='random'" in repr(encoder)
    assert encoder(torch.zeros(1, 3, 224, 224)).dtype == torch.bfloat16  # float32 input is cast


def test_checkpoint_of_another_encoder_is_named_in_the_error(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(official_timm_reference("uni").state_dict(), path)
    with pytest.raises(WeightsMismatchError) as err:
        load_tile_encoder("virchow", weights=path, **TINY_VIT)
    message = str(err.value)
    assert str(path) in message and "'virchow'" in message
    assert "shape mismatches: pos_embed (checkpoint (1, 197, 48), model (1, 257, 48))" in message
    assert "Is this a checkpoint for 'uni'?" in message
    assert err.value.mismatched and err.value.path == path


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_checkpoint_names_the_file(suffix, tmp_path):
    state = official_timm_reference("uni").state_dict()
    whole = tmp_path / f"whole{suffix}"
    save_file(state, whole) if suffix == ".safetensors" else torch.save(state, whole)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match=rf"{truncated.name}: cannot read the weights file"):
        load_tile_encoder("uni", weights=truncated, **TINY_VIT)


def test_unsafe_pickle_is_refused(tmp_path):
    # argparse.Namespace (DINO's pickled arguments) is allowed; other Python objects are not.
    path = tmp_path / "with_path.pth"
    torch.save({"model": {}, "output_dir": pathlib.PurePosixPath("/runs/x")}, path)
    with pytest.raises(CorruptWeightsError, match="cannot be loaded safely"):
        load_tile_encoder("uni", weights=path, **TINY_VIT)


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="weights file not found"):
        load_tile_encoder("uni", weights=tmp_path / "nope.bin", **TINY_VIT)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match=r"none of model\.safetensors, pytorch_model\.bin.*other\."):
        load_tile_encoder("uni", weights=tmp_path, **TINY_VIT)


# --------------------------------------------------------------------------------------------
# Every registered encoder, tiny: forward, backward, finite, fp32/bf16 agreement

UNUSED_IN_EMBEDDING = {"conch": {"model.proj_contrast"}}  # CONCH's zero-shot projection


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_encoder_runs_trains_and_agrees_in_bf16(name):
    torch.manual_seed(8)
    encoder = load_tile_encoder(name, weights="random", **TINY[name])
    spec = encoder.spec
    tiles = np.random.default_rng(0).integers(0, 256, (2, spec.native_tile, spec.native_tile, 3), dtype=np.uint8)
    x = encoder.transform(tiles)
    out = encoder(x)
    assert out.shape == (2, encoder.embed_dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = {n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
    assert no_grad == UNUSED_IN_EMBEDDING.get(name, set())
    with torch.no_grad():
        low = copy.deepcopy(encoder).to(torch.bfloat16)(x).float()
    assert F.cosine_similarity(low, out.detach(), dim=-1).min() > 0.99
