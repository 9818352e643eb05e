"""HIPT, region and slide levels (``vit4k_xs`` + ``HIPT_LGP_FC``).

Chen et al., "Scaling Vision Transformers to Gigapixel Images via Hierarchical
Self-Supervised Learning", CVPR 2022. Notation: B slides, N tiles, D tile dim (384,
ViT-256 cls embeddings), E region width (192), G = 16 tiles per region edge,
R regions in the batch, M regions per slide (padded to the most).

Regions. A 4096-px region is a G × G grid of 256-px tiles. Tiles are grouped by
``region = floor(coords / (G·tile_size))`` (level-0 coords, so ``tile_size`` is the
tile edge in level-0 px, the features' ``patch_size_level0``); a tile goes to cell
``row·G + col`` of its region, row = y, col = x, the row-major order of
``HIPT_4K``'s unfold and of ``x_256.unfold(1, 16, 16)``. Cells without a tile (the
region runs off the tissue) hold zeros, where the official pipeline holds the
embedding of the background crop it cut; tiles sharing a cell (overlapping grids)
are averaged. Masked tiles are never placed.

Region level, ``VisionTransformer4K`` (``vit4k_xs``): the grid (R, D, G, G) → tokens
row-major → ``phi = Linear(D, E) → GELU → Dropout`` → [cls; tokens] + pos_embed →
6 pre-LN blocks (6 heads, MLP 4·E, LN eps 1e-6) → ``norm`` → cls. ``pos_embed`` is the
learned (1, 197, E) table of a 14 × 14 grid, resized for 16 × 16 with DINO's
``scale_factor = (16 + 0.1)/14`` bicubic call, which PyTorch maps with scale 1.15,
not 16/14: kept so pretrained weights see what they were trained with.

Slide level (``HIPT_LGP_FC``, ``pretrain_WSI='None'``): ``global_phi = Linear → ReLU →
Dropout(0.25)`` per region, a 2-layer post-LN ``nn.TransformerEncoder`` (E, 3 heads,
feed-forward E, ReLU, dropout 0.25) over the regions of a slide, gated attention
pooling (``global_attn_pool``, CLAM's ``Attn_Net_Gated``), ``global_rho = Linear →
ReLU → Dropout(0.25)``, ``classifier``. Padded regions are excluded from both the
transformer's keys and the pooling softmax. The slide embedding is ``global_rho``'s
output; ``scores`` is each tile's region attention weight.

Weights: ``load_slide_model("hipt", weights=...)`` loads a whole ``HIPT_LGP_FC``
state dict; the DINO-pretrained region ViT (``vit4k_xs_dino.pth``) covers only
``local_vit`` and is loaded with :func:`load_vit4k_dino`.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from histoscope.io.checkpoint import compare_state_dict, read_checkpoint
from histoscope.layers.gated_attention import GatedAttentionNet
from histoscope.slide.base import SlideModel, SlideOutput, default_mask, masked_softmax
from histoscope.slide.registry import SlideWeightsError

__all__ = ["HIPT", "VisionTransformer4K", "region_grids", "hipt_state_dict", "vit4k_state_dict", "load_vit4k_dino"]


class VisionTransformer4K(nn.Module):
    """HIPT's ViT-4K on a grid of tile embeddings; parameter names as ``vit4k_xs``.

    Parameters
    ----------
    in_dim : int
        D.
    embed_dim, depth, num_heads : int
        E, blocks, heads.
    mlp_ratio : float
        MLP width E·mlp_ratio.
    pretrain_grid : int
        Side of the grid ``pos_embed`` is stored for (DINO-4K's 224/16 = 14).
    drop_rate, attn_drop_rate, drop_path_rate : float
        As timm/DINO (0 in ``vit4k_xs``).
    """

    def __init__(self, *, in_dim: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 pretrain_grid: int = 14, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid**2 + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, rows: int, cols: int) -> Tensor:
        """(1, 1 + rows·cols, E): the stored table, resized as DINO does for another grid."""
        n = self.pos_embed.shape[1] - 1
        if rows * cols == n and rows == cols:
            return self.pos_embed
        side = int(math.sqrt(n))
        patch = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, E, side, side)
        # DINO's +0.1 (facebookresearch/dino#8); with scale_factor given, PyTorch samples at that scale.
        patch = F.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        if patch.shape[-2:] != (rows, cols):
            raise ValueError(f"cannot resize a {side}x{side} position table to {rows}x{cols}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward(self, grid: Tensor) -> Tensor:
        """grid (R, D, rows, cols) → region embeddings (R, E)."""
        R, _, rows, cols = grid.shape
        x = self.phi(grid.flatten(2).transpose(1, 2))  # (R, rows·cols, E), row-major
        x = torch.cat([self.cls_token.expand(R, -1, -1), x], dim=1)
        x = self.pos_drop(x + self.interpolate_pos_encoding(rows, cols))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def region_grids(features: Tensor, coords: Tensor, mask: Tensor, *, tile_size: float,
                 region_tiles: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Place the real tiles of each slide into G × G region grids.

    Parameters
    ----------
    features : Tensor
        (B, N, D).
    coords : Tensor
        (B, N, 2) level-0 (x, y).
    mask : Tensor
        (B, N) bool, True at real tiles.

    Returns
    -------
    grids : Tensor
        (R, G·G, D), cell ``row·G + col``; empty cells 0, shared cells averaged.
    regions : Tensor
        (R, 3) int64 (slide, region row, region col), sorted.
    tile_region : Tensor
        (B, N) int64, each real tile's region in ``regions`` (-1 at padding).
    tile_cell : Tensor
        (B, N) int64, each real tile's cell (-1 at padding).
    """
    B, N, D = features.shape
    G = region_tiles
    cell = torch.floor(coords.to(torch.float64) / tile_size).long()  # (B, N, 2) tile (col, row)
    region = torch.div(cell, G, rounding_mode="floor")  # (B, N, 2) region (col, row)
    within = cell - region * G
    slot = within[..., 1] * G + within[..., 0]  # (B, N) row-major
    b, n = mask.nonzero(as_tuple=True)  # (T,) real tiles
    keys = torch.stack([b, region[b, n, 1], region[b, n, 0]], dim=1)  # (T, 3)
    regions, inverse = torch.unique(keys, dim=0, return_inverse=True)  # sorted by slide, row, col
    flat = inverse * G * G + slot[b, n]  # (T,)
    sums = features.new_zeros(len(regions) * G * G, D).index_add(0, flat, features[b, n])
    hits = torch.bincount(flat, minlength=len(regions) * G * G).clamp(min=1).to(features.dtype)
    grids = (sums / hits.unsqueeze(-1)).view(len(regions), G * G, D)
    tile_region = torch.full((B, N), -1, dtype=torch.long, device=features.device)
    tile_cell = torch.full((B, N), -1, dtype=torch.long, device=features.device)
    tile_region[b, n] = inverse
    tile_cell[b, n] = slot[b, n]
    return grids, regions, tile_region, tile_cell


class HIPT(SlideModel):
    """HIPT ``HIPT_LGP_FC`` on tile embeddings and coordinates (see the module notes).

    Parameters
    ----------
    in_dim : int
        D (384 for HIPT's ViT-256).
    num_outputs : int
        C; > 0 adds the ``classifier``.
    tile_size : float
        Level-0 px per tile (grid step of the coords): the features' tile geometry
        ``size_level0`` (``histoscope train`` sets it from the features file).
    region_tiles : int
        G, tiles per region edge (4096 / 256).
    embed_dim, local_depth, local_heads : int
        The region ViT (E, blocks, heads); E is also the slide-level width.
    global_depth, global_heads : int
        The slide-level transformer.
    dropout : float
        Slide-level dropout (HIPT hard-codes 0.25).
    local_drop_rate : float
        Region ViT dropout (0 in ``vit4k_xs``).
    """

    def __init__(self, *, in_dim: int, num_outputs: int, tile_size: float, region_tiles: int, embed_dim: int,
                 local_depth: int, local_heads: int, global_depth: int, global_heads: int, dropout: float,
                 local_drop_rate: float):
        super().__init__()
        self.tile_size = tile_size
        self.region_tiles = region_tiles
        self.embed_dim = embed_dim
        self.num_outputs = num_outputs
        self.local_vit = VisionTransformer4K(in_dim=in_dim, embed_dim=embed_dim, depth=local_depth,
                                             num_heads=local_heads, drop_rate=local_drop_rate)
        self.global_phi = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        layer = nn.TransformerEncoderLayer(d_model=embed_dim, nhead=global_heads, dim_feedforward=embed_dim,
                                           dropout=dropout, activation="relu", batch_first=True)
        self.global_transformer = nn.TransformerEncoder(layer, num_layers=global_depth, enable_nested_tensor=False)
        self.global_attn_pool = GatedAttentionNet(in_dim=embed_dim, hidden_dim=embed_dim, num_branches=1,
                                                  dropout=dropout)
        self.global_rho = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embed_dim, num_outputs) if num_outputs > 0 else None

    def forward(self, features: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> SlideOutput:
        """``extras``: ``region_attention`` (B, M) pooling weights, ``region_mask`` (B, M),
        ``region_coords`` (B, M, 2) level-0 (x, y) of each region's corner, ``region_index``
        (B, N) each tile's region (-1 at padding)."""
        if coords is None:
            raise ValueError("HIPT needs the tiles' level-0 coords to build its 4096-px regions")
        mask = default_mask(features, mask)  # (B, N)
        B, N, D = features.shape
        G = self.region_tiles
        grids, regions, tile_region, _ = region_grids(features, coords, mask, tile_size=self.tile_size,
                                                      region_tiles=G)
        h = self.local_vit(grids.transpose(1, 2).reshape(len(regions), D, G, G))  # (R, E)

        slide = regions[:, 0]  # (R,)
        per_slide = torch.bincount(slide, minlength=B)  # (B,)
        M = int(per_slide.max()) if len(regions) else 0
        position = torch.arange(len(regions), device=h.device) - (per_slide.cumsum(0) - per_slide)[slide]  # (R,)
        region_mask = torch.zeros(B, M, dtype=torch.bool, device=h.device)
        region_mask[slide, position] = True
        x = h.new_zeros(B, M, h.shape[-1]).index_put((slide, position), h)  # (B, M, E)

        x = self.global_phi(x)
        x = self.global_transformer(x, src_key_padding_mask=~region_mask)
        attention = masked_softmax(self.global_attn_pool(x).squeeze(-1), region_mask)  # (B, M)
        embedding = self.global_rho((attention.unsqueeze(1) @ x).squeeze(1))  # (B, E)
        logits = self.classifier(embedding) if self.classifier is not None else None

        real = tile_region >= 0
        region_index = torch.where(real, position[tile_region.clamp(min=0)], -1)  # (B, N) slot in the slide
        scores = torch.where(real, attention.gather(1, region_index.clamp(min=0)), 0.0)
        corners = torch.zeros(B, M, 2, dtype=torch.float64, device=h.device)
        corners[slide, position] = regions[:, [2, 1]].to(torch.float64) * (G * self.tile_size)
        extras = {"region_attention": attention, "region_mask": region_mask, "region_coords": corners,
                  "region_index": region_index}
        return SlideOutput(embedding=embedding, logits=logits, scores=scores, extras=extras)


def hipt_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """A ``HIPT_LGP_FC`` state dict as HIPT's training saves it → this model's keys.

    Removes a wrapping ``state_dict``/``model``, a leading ``module.`` and the
    ``local_vit.module.`` of HIPT's ``relocate()`` (DataParallel around the region ViT).
    """
    if "teacher" in checkpoint:
        raise SlideWeightsError("this is a DINO checkpoint of the region ViT only; build the model, then call "
                                "histoscope.slide.models.hipt.load_vit4k_dino(model, path)")
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    return {re.sub(r"^local_vit\.module\.", "local_vit.", k.removeprefix("module.")): v
            for k, v in checkpoint.items()}


def vit4k_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """DINO-4K training checkpoint (``{"teacher": {"backbone.*", "head.*"}, ...}``) →
    ``VisionTransformer4K`` keys: the teacher, ``module.``/``backbone.`` stripped, the
    DINO projection head (``head.*``) dropped."""
    state = checkpoint.get("teacher", checkpoint)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if not key.startswith("head."):
            out[key] = value
    return out


def load_vit4k_dino(model: HIPT | VisionTransformer4K, path: str | Path) -> None:
    """Load the published ``vit4k_xs_dino.pth`` into a HIPT model's ``local_vit``
    (or a bare :class:`VisionTransformer4K`), strictly."""
    path = Path(path)
    checkpoint = read_checkpoint(path, kind="weights")
    vit = model.local_vit if isinstance(model, HIPT) else model
    state = vit4k_state_dict(checkpoint)
    missing, unexpected, mismatched = compare_state_dict(vit, state)
    if missing or unexpected or mismatched:
        raise SlideWeightsError(
            f"{path} does not fit the region ViT: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(mismatched)} shape mismatches "
            f"{mismatched[:8]}")
    vit.load_state_dict(state)
