"""Slide-level masked autoencoding over tile embeddings: Prov-GigaPath's second stage.

Prov-GigaPath pretrains its LongNet slide encoder as an MAE whose tokens are the tile
embeddings of a slide (its code for this stage is not published; this follows the
paper and MAE). Per slide (features streamed from ``histoscope embed``'s h5 files):

* at most ``max_tiles`` tiles (a seeded subset, grid order kept);
* ``int(n * (1 - mask_ratio))`` tiles kept, chosen by per-tile uniform noise as
  :func:`~histoscope.pretrain.mae.random_masking` chooses patches; the kept tokens stay
  in the slide's order, so the dilated attention's segments still hold neighbours;
* encoder: ``gigapath_slide`` exactly as it embeds a slide (``patch_embed`` + its 2-D
  sin-cos positions of the tile grid, class token, LongNet layers, ``encoder.layer_norm``)
  on the kept tiles only;
* light decoder: ``decoder_embed``, a mask token at every masked tile, sin-cos positions
  of the same grid at the decoder width, ``decoder_depth`` LongNet layers (dilated
  attention with the encoder's branches, so memory stays linear in the number of tiles),
  ``decoder_norm``, ``decoder_pred`` back to the tile-embedding width;
* loss: mean squared error on the masked tiles only (:func:`~histoscope.pretrain.mae.mae_loss`),
  optionally against per-tile standardised embeddings (``norm_target``, MAE's norm_pix_loss).

The exported file is the encoder's state dict in the published layout,
``{"model": state_dict}`` as ``slide_encoder.pth``; ``load_slide_model("gigapath_slide",
in_dim=D, weights=PATH, **arch)`` loads it strictly. The outer ``norm`` (pooling only)
is not part of this computation and is left at its initial value, as the official
demo notes of the published weights.

Notation: B slides per rank, N tiles (padded to the longest), K kept, D tile dim,
E encoder width, Ed decoder width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoscope.layers.sincos import sincos_2d
from histoscope.pretrain.feature_data import SlideFeatureIndex, find_feature_slides, with_tile_size
from histoscope.pretrain.mae import mae_loss
from histoscope.pretrain.objective import Objective, RunInfo, register_objective, seeded_rng
from histoscope.pretrain.optim import param_groups
from histoscope.utils.recipe import ConfigError

__all__ = ["SlideMAE", "SlideMAEConfig", "SlideMAEStudent", "keep_by_noise"]


@dataclass
class SlideDecoderConfig:
    decoder_embed_dim: int = 384
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class SlideMAEConfig:
    mask_ratio: float = 0.75
    norm_target: bool = False  # standardise each target tile embedding (MAE's norm_pix_loss)
    max_tiles: int = 16384  # tiles per slide and step (a seeded subset beyond)
    decoder: SlideDecoderConfig = field(default_factory=SlideDecoderConfig)


def _validate(config: SlideMAEConfig, common) -> None:
    problems = []
    if not 0 < config.mask_ratio < 1:
        problems.append(f"mask_ratio must be in (0, 1), got {config.mask_ratio}")
    if config.max_tiles < 2:
        problems.append("max_tiles must be >= 2")
    d = config.decoder
    if d.decoder_embed_dim % 4 or d.decoder_embed_dim % d.decoder_num_heads:
        problems.append("decoder.decoder_embed_dim must be divisible by 4 and by decoder.decoder_num_heads")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))


def keep_by_noise(noise: torch.Tensor, valid: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """(B, N) bool, True at the ``int(n_b * (1 - mask_ratio))`` (at least 1) real tiles of smallest noise."""
    n_keep = (valid.sum(1) * (1 - mask_ratio)).long().clamp(min=1)  # (B,), MAE's int(L * (1 - r))
    noise = noise.masked_fill(~valid, float("inf"))
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, N) each tile's place in noise order
    return rank < n_keep.unsqueeze(1)


class SlideMAEStudent(nn.Module):
    """``gigapath_slide`` encoder + light LongNet decoder: ``forward(features, coords, valid, noise)``
    -> (pred (B, N, D), loss mask (B, N) float: 1 at masked real tiles)."""

    def __init__(self, *, encoder: nn.Module, mask_ratio: float, decoder_embed_dim: int, decoder_depth: int,
                 decoder_num_heads: int, mlp_ratio: float):
        from histoscope.slide.models.longnet import LongNetEncoderLayer

        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        attention = encoder.encoder.layers[0].self_attn
        in_dim = encoder.patch_embed.proj.in_features
        self.decoder_embed = nn.Linear(encoder.width, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_layers = nn.ModuleList(
            LongNetEncoderLayer(dim=decoder_embed_dim, num_heads=decoder_num_heads,
                                ffn_dim=int(decoder_embed_dim * mlp_ratio), segment_lengths=attention.segment_lengths,
                                dilation_ratios=attention.dilation_ratios, dropout=0.0, drop_path=0.0,
                                count_pad_keys=attention.count_pad_keys)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, in_dim)
        for module in (self.decoder_embed, self.decoder_layers, self.decoder_norm, self.decoder_pred):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    nn.init.zeros_(sub.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        from histoscope.slide.models.longnet import grid_indices

        enc = self.encoder
        B, N, _ = features.shape
        keep = keep_by_noise(noise, valid, self.mask_ratio)  # (B, N)
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept tiles first, in slide order
        K = int(keep.sum(1).max())
        kept_ids = order[:, :K]  # (B, K)
        kept_real = torch.arange(K, device=features.device) < keep.sum(1, keepdim=True)  # (B, K)

        x = enc.patch_embed(features)  # (B, N, E)
        x = x + enc.position_embedding(coords, x.dtype)
        x = x.gather(1, kept_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, E)
        x = torch.cat([enc.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1)
        attn_mask = None if bool(kept_real.all()) else F.pad(kept_real, (1, 0), value=True)
        h, _ = enc.encoder(x, attn_mask)  # (B, 1 + K, E)

        y = self.decoder_embed(h)  # (B, 1 + K, Ed)
        placed = y.new_zeros(B, N, y.shape[-1]).scatter(1, kept_ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y[:, 1:])
        tokens = torch.where(keep.unsqueeze(-1), placed, self.mask_token.to(y.dtype))  # (B, N, Ed)
        gx, gy = grid_indices(coords, enc.tile_size, enc.slide_ngrids)
        tokens = tokens + sincos_2d(gy, gx, y.shape[-1], dtype=y.dtype)  # the encoder's table, at Ed
        z = torch.cat([y[:, :1], tokens], dim=1)  # (B, 1 + N, Ed)
        dec_mask = None if bool(valid.all()) else F.pad(valid, (1, 0), value=True)
        for layer in self.decoder_layers:
            z = layer(z, dec_mask)
        pred = self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, N, D)
        return pred, (valid & ~keep).float()


@dataclass(frozen=True)
class SlideMAECollate:
    """Per rank and step: the slides' tiles (a seeded subset beyond ``max_tiles``), padded, and their noise."""

    max_tiles: int

    def __call__(self, slides: list[dict], *, positions: np.ndarray, step: int, rank: int, world_size: int,
                 seed: int) -> dict[str, Any]:
        parts = []
        for slide, position in zip(slides, positions):
            features, coords = slide["features"], slide["coords"]
            if len(features) > self.max_tiles:
                rows = np.sort(seeded_rng(seed, position, 2).choice(len(features), self.max_tiles, replace=False))
                features, coords = features[rows], coords[rows]
            parts.append((features, coords, seeded_rng(seed, position, 1).random(len(features), dtype=np.float32)))
        b, n, dim = len(parts), max(len(p[0]) for p in parts), parts[0][0].shape[1]
        batch = {"features": np.zeros((b, n, dim), np.float32), "coords": np.zeros((b, n, 2), np.int64),
                 "valid": np.zeros((b, n), bool), "noise": np.ones((b, n), np.float32)}
        for i, (features, coords, noise) in enumerate(parts):
            m = len(features)
            batch["features"][i, :m], batch["coords"][i, :m], batch["noise"][i, :m] = features, coords, noise
            batch["valid"][i, :m] = True
        return {k: torch.from_numpy(v) for k, v in batch.items()}


class SlideMAE(Objective):
    def __init__(self, *, student: SlideMAEStudent, config: SlideMAEConfig, model_name: str, in_dim: int, arch: dict):
        super().__init__()
        self.student = student
        self.config, self.model_name, self.in_dim, self.arch = config, model_name, in_dim, dict(arch)

    def collate(self) -> SlideMAECollate:
        return SlideMAECollate(max_tiles=self.config.max_tiles)

    def forward(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        features = batch["features"]
        pred, mask = self.run_student(features, batch["coords"], batch["valid"], batch["noise"])
        loss = mae_loss(pred.float(), features.float(), mask, norm_pix_loss=self.config.norm_target)
        return {"loss": loss, "slide_mae_loss": loss}

    def param_groups(self) -> list[dict]:
        return param_groups(self.student, n_blocks=0)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("slide_mae trains a slide encoder: it has no tile embedding to probe")

    def export(self, out_dir: Path) -> Path:
        """``OUT/export/<model>_slide_mae.pth``: ``{"model": encoder state dict}`` as Prov-GigaPath publishes
        ``slide_encoder.pth``, plus a JSON note with the ``load_slide_model`` call."""
        from histoscope.io.atomic import atomic_path, write_json

        state = {k: v.detach().cpu().contiguous() for k, v in self.student.encoder.state_dict().items()}
        path = Path(out_dir) / "export" / f"{self.model_name}_slide_mae.pth"
        with atomic_path(path) as tmp:
            torch.save({"model": state}, tmp)
        args = ", ".join(f"{k}={v!r}" for k, v in self.arch.items())
        write_json(path.with_suffix(".json"), {
            "slide_model": self.model_name, "in_dim": self.in_dim, "arch": self.arch, "objective": "slide_mae",
            "load": f"load_slide_model({self.model_name!r}, in_dim={self.in_dim}, weights={str(path)!r}"
                    f"{', ' + args if args else ''})"})
        return path


def _slide_index(config: SlideMAEConfig, common, log) -> SlideFeatureIndex:
    return SlideFeatureIndex(find_feature_slides(common.data.features, log=log))


@register_objective(name="slide_mae", description="Slide-level MAE over tile embeddings for the LongNet slide "
                                                  "encoder (Prov-GigaPath stage 2)",
                    config=SlideMAEConfig, validate=_validate, inputs="features", index=_slide_index)
def build_slide_mae(config: SlideMAEConfig, common, info: RunInfo) -> SlideMAE:
    from histoscope.slide import load_slide_model
    from histoscope.slide.models.longnet import LongNetSlideEncoder

    slides = find_feature_slides(common.data.features, log=lambda message: None)
    arch = with_tile_size(common.encoder, common.arch, slides)
    torch.manual_seed(info.seed)  # the same initial model on every rank
    weights = None if common.weights == "random" else common.weights
    encoder = load_slide_model(common.encoder, in_dim=slides[0].dim, num_outputs=0, weights=weights, **arch)
    if not isinstance(encoder, LongNetSlideEncoder):
        raise ConfigError(f"slide_mae trains the LongNet slide encoder (encoder: gigapath_slide), not "
                          f"{common.encoder!r}")
    encoder.norm.requires_grad_(False)  # pooling only: not part of masked reconstruction
    d = config.decoder
    student = SlideMAEStudent(encoder=encoder, mask_ratio=config.mask_ratio, decoder_embed_dim=d.decoder_embed_dim,
                              decoder_depth=d.decoder_depth, decoder_num_heads=d.decoder_num_heads,
                              mlp_ratio=d.mlp_ratio)
    objective = SlideMAE(student=student, config=config, model_name=common.encoder, in_dim=slides[0].dim, arch=arch)
    return objective.to(info.device).train()

