"""MAE (He et al. 2022) for tile encoders, as ``facebookresearch/mae`` ``models_mae.py`` trains.

Per image: one random resized crop (MAE's, plus the flips and 90° turns tissue allows),
a per-patch uniform noise, and :func:`random_masking`: the patches with the
``(1 - mask_ratio) * N`` smallest noise values are kept (in noise order), the others
masked. The encoder (any ViT of the tile-encoder registry, its class and register
tokens kept) sees the kept patches only, with its own position embeddings added
before masking. A light decoder (``decoder_embed`` -> mask tokens put back in place
-> fixed 2-D sin-cos positions of its own width -> ``decoder_depth`` pre-LN blocks ->
``decoder_norm`` -> ``decoder_pred``) predicts every patch's pixels; the loss
(:func:`mae_loss`) is the mean squared error on the masked patches only, against
per-patch normalised pixels with ``norm_pix_loss``.

From random weights the encoder's position embedding is MAE's fixed sin-cos table
(``fixed_pos_embed``, frozen); continued pretraining keeps the published one and
trains it. The noise of each image is seeded by ``(seed, stream position)``, so masks
do not depend on the number of processes or on where a run resumed. The exported
encoder is the registry module in its published key layout (``histoscope embed``).

Notation: B images, g x g patch grid, N = g * g patches, K kept, P prefix (class and
register) tokens, C encoder width, Cd decoder width, p patch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from histoscope.layers.sincos import sincos_2d
from histoscope.pretrain.augment import MultiCropAugment
from histoscope.pretrain.backbone import MaskedViT
from histoscope.pretrain.dinov2 import AugmentConfig
from histoscope.pretrain.encoder_objective import EncoderObjective
from histoscope.pretrain.objective import RunInfo, register_objective, seeded_rng
from histoscope.pretrain.optim import param_groups
from histoscope.utils.recipe import ConfigError

__all__ = ["MAE", "MAEConfig", "MAEStudent", "grid_sincos", "mae_backbone", "mae_loss", "patchify", "random_masking"]


@dataclass
class MAEAugmentConfig(AugmentConfig):
    """MAE's augmentation is a crop and a flip; colour, stain and blur jitters are off unless asked."""

    color_jitter: float = 0.0
    hed_jitter: float = 0.0
    grayscale: float = 0.0
    blur: tuple[float, float, float] = (0.0, 0.0, 0.0)
    solarize: float = 0.0


@dataclass
class DecoderConfig:
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    fixed_pos_embed: bool | None = None  # None: True from random weights, False for continued pretraining
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    augment: MAEAugmentConfig = field(default_factory=MAEAugmentConfig)


def _validate(config: MAEConfig, common) -> None:
    problems = []
    if not 0 < config.mask_ratio < 1:
        problems.append(f"mask_ratio must be in (0, 1), got {config.mask_ratio}")
    if config.decoder.decoder_embed_dim % 4 or config.decoder.decoder_embed_dim % config.decoder.decoder_num_heads:
        problems.append("decoder.decoder_embed_dim must be divisible by 4 and by decoder.decoder_num_heads")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))


def random_masking(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample masking by argsort of ``noise``.

    x (B, N, C), noise (B, N) -> kept tokens (B, K, C) in ascending-noise order,
    mask (B, N) float (1 masked, 0 kept), ids_restore (B, N) (inverse of the shuffle);
    K = int(N * (1 - mask_ratio)).
    """
    B, N, C = x.shape
    keep = int(N * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, C))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p * p * 3), patches row-major, pixels (row, col, channel) within."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error (MAE's ``forward_loss``).

    pred, target (B, N, L); mask (B, N) with 1 at masked patches. With ``norm_pix_loss``
    each target patch is standardised by its own mean and (unbiased) variance + 1e-6.
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (loss * mask).sum() / mask.sum()


def grid_sincos(rows: int, cols: int, dim: int, *, device=None) -> torch.Tensor:
    """(rows * cols, dim) float32 MAE table ``get_2d_sincos_pos_embed`` for a row-major grid."""
    row, col = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return sincos_2d(col.flatten(), row.flatten(), dim)


def _init_decoder(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEStudent(nn.Module):
    """Encoder (a registry ViT) + MAE decoder: ``forward(images, noise) -> (pred (B, N, p*p*3), mask (B, N))``."""

    def __init__(self, *, backbone: MaskedViT, mask_ratio: float, decoder_embed_dim: int, decoder_depth: int,
                 decoder_num_heads: int, mlp_ratio: float):
        super().__init__()
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        p = backbone.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, p * p * 3)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_decoder)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor):
        vit = self.backbone.vit
        x = vit._pos_embed(vit.patch_embed(images))  # (B, P + N, C): positions added, prefix tokens first
        P = vit.num_prefix_tokens
        kept, mask, ids_restore = random_masking(x[:, P:], noise, self.mask_ratio)  # (B, K, C)
        x = vit.norm_pre(torch.cat([x[:, :P], kept], dim=1))
        x = vit.norm(vit.blocks(x))  # (B, P + K, C)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        P = self.backbone.vit.num_prefix_tokens
        x = self.decoder_embed(x)  # (B, P + K, Cd)
        B, N = ids_restore.shape
        tokens = torch.cat([x[:, P:], self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - P), -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, Cd)
        positions = grid_sincos(*grid, x.shape[-1], device=x.device).to(x.dtype)  # prefix tokens get none
        x = torch.cat([x[:, :P], tokens + positions], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:]  # (B, N, p*p*3)

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.backbone.patch_size
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore, (images.shape[-2] // p, images.shape[-1] // p))
        return pred, mask


@dataclass(frozen=True)
class MAECollate:
    """Per rank and step: one augmented view per tile (uint8) and its patch noise."""

    augment: MultiCropAugment
    num_patches: int

    def __call__(self, tiles: list[np.ndarray], *, positions: np.ndarray, step: int, rank: int, world_size: int,
                 seed: int) -> dict[str, Any]:
        views = np.stack([self.augment.view(tile, seeded_rng(seed, position)) for tile, position in
                          zip(tiles, positions)])  # (b, S, S, 3)
        noise = np.stack([seeded_rng(seed, position, 1).random(self.num_patches, dtype=np.float32)
                          for position in positions])  # (b, N)
        return {"images": torch.from_numpy(views).permute(0, 3, 1, 2).contiguous(), "noise": torch.from_numpy(noise)}


class MAE(EncoderObjective):
    def __init__(self, *, student: MAEStudent, config: MAEConfig, encoder: str, arch: dict, spec, optim):
        super().__init__()
        self.student = student
        self.config, self.optim = config, optim
        self._setup_encoder(spec=spec, encoder=encoder, arch=arch, input_size=config.input_size, tag="mae")

    def collate(self) -> MAECollate:
        augment = asdict(self.config.augment)
        view = MultiCropAugment(global_size=self.config.input_size, global_scale=self.config.crop_scale,
                                local_number=0, **augment)
        grid = self.config.input_size // self.student.backbone.patch_size
        return MAECollate(augment=view, num_patches=grid * grid)

    def forward(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        images = self.normalize(batch["images"])
        pred, mask = self.run_student(images, batch["noise"])
        target = patchify(images, self.student.backbone.patch_size)
        loss = mae_loss(pred.float(), target, mask, norm_pix_loss=self.config.norm_pix_loss)
        return {"loss": loss, "mae_loss": loss}

    def param_groups(self) -> list[dict]:
        backbone = self.student.backbone
        groups = param_groups(backbone, n_blocks=len(backbone.vit.blocks), lr_decay_rate=self.optim.layerwise_decay,
                              patch_embed_lr_mult=self.optim.patch_embed_lr_mult)
        decoder = [m for name, m in self.student.named_children() if name != "backbone"]
        return groups + param_groups(nn.ModuleList(decoder), n_blocks=0) + param_groups(
            nn.ParameterList([self.student.mask_token]), n_blocks=0)

    def exported_encoder(self) -> nn.Module:
        return self.student.backbone.model

    def export_note(self) -> dict:
        return {"objective": "mae", "mask_ratio": self.config.mask_ratio}


def _fix_pos_embed(backbone: MaskedViT) -> None:
    """MAE's fixed sin-cos encoder positions (class and register rows zero), frozen."""
    vit = backbone.vit
    if vit.pos_embed is None:
        return
    rows, cols = vit.patch_embed.grid_size
    table = grid_sincos(rows, cols, vit.embed_dim)
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[0, vit.pos_embed.shape[1] - rows * cols :] = table.to(vit.pos_embed.dtype)
    vit.pos_embed.requires_grad_(False)


def mae_backbone(model: nn.Module, *, encoder: str, fixed_pos_embed: bool) -> MaskedViT:
    """A registry encoder module as MAE's encoder: what MAE does not compute with is frozen (DINOv2's
    mask token, the pooled head: ``fc_norm``, ``attn_pool``, ``head``), and with ``fixed_pos_embed``
    the position table is MAE's fixed sin-cos."""
    backbone = MaskedViT(model=model, encoder=encoder)
    backbone.mask_token.requires_grad_(False)  # MAE drops masked patches instead
    for name in ("fc_norm", "attn_pool", "head"):
        module = getattr(backbone.vit, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    if fixed_pos_embed:
        _fix_pos_embed(backbone)
    return backbone


@register_objective(name="mae", description="MAE: masked-patch pixel reconstruction with a light decoder "
                                            "(tile encoders)", config=MAEConfig, validate=_validate)
def build_mae(config: MAEConfig, common, info: RunInfo) -> MAE:
    from histoscope.encoders import load_tile_encoder

    torch.manual_seed(info.seed)  # the same initial model on every rank
    weights = f"random:{info.seed}" if common.weights == "random" else common.weights
    encoder = load_tile_encoder(common.encoder, weights=weights, **common.arch)
    backbone = mae_backbone(encoder.model, encoder=common.encoder, fixed_pos_embed=(
        config.fixed_pos_embed if config.fixed_pos_embed is not None else common.weights == "random"))
    if config.input_size % backbone.patch_size:
        fit = max(backbone.patch_size, round(config.input_size / backbone.patch_size) * backbone.patch_size)
        raise ConfigError(f"input_size={config.input_size} is not a multiple of the patch size {backbone.patch_size} "
                          f"of {common.encoder!r}; use input_size={fit}")
    decoder = config.decoder
    student = MAEStudent(backbone=backbone, mask_ratio=config.mask_ratio, decoder_embed_dim=decoder.decoder_embed_dim,
                         decoder_depth=decoder.decoder_depth, decoder_num_heads=decoder.decoder_num_heads,
                         mlp_ratio=decoder.mlp_ratio)
    objective = MAE(student=student, config=config, encoder=common.encoder, arch=dict(common.arch),
                    spec=encoder.spec, optim=common.optim)
    return objective.to(info.device).train()
