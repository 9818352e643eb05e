"""DINOv2 (Oquab et al. 2023) for tile encoders, as ``dinov2/train/ssl_meta_arch.py`` trains.

A student and an EMA teacher share the backbone architecture (any ViT of the tile-encoder
registry) and carry a DINO head on class tokens and a separate iBOT head on masked patch
tokens. Per image: 2 global and ``local_crops_number`` local crops; the student sees all
crops (global ones with block masks), the teacher the global crops only. Losses and their
scaling are the reference's:

* DINO: every local crop against both teacher global crops, and each global crop against
  the *other* one (the teacher's two chunks are swapped), divided by the number of terms
  ``2 + 2 * n_local``; the global term is multiplied by 2 because both global crops go
  through the loss as one batch;
* iBOT: masked-patch cross-entropy, scaled by ``2 * 1/2`` (global crops together x
  ``ibot_loss_scale = 1 / n_global_crops``);
* KoLeo on the student's backbone class tokens, one global crop at a time, summed, times
  its weight;
* teacher centring by a running centre (applied one step late) or Sinkhorn-Knopp.

The logged ``koleo_loss`` and ``ibot_loss`` are halved, as the reference displays them.
Deviation, so that results do not depend on the number of processes: iBOT masks are drawn
for the whole global batch per step and each rank takes its part (DINOv2 draws per GPU).

Notation: b images per rank, K prototypes, N patch tokens per global crop, M masked.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from histoscope.pretrain.augment import MultiCropAugment
from histoscope.pretrain.backbone import MaskedViT
from histoscope.pretrain.heads import DINOHead
from histoscope.pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from histoscope.pretrain.masking import BlockMaskGenerator, draw_masks
from histoscope.pretrain.encoder_objective import EncoderObjective
from histoscope.pretrain.objective import Objective, RunInfo, register_objective, seeded_rng
from histoscope.pretrain.optim import param_groups
from histoscope.pretrain.schedules import cosine_schedule
from histoscope.utils.recipe import ConfigError

__all__ = ["DINOv2", "DINOv2Collate", "DINOv2Config", "DINOv2Student", "SelfDistillation", "dino_crop_losses",
           "ema_update"]

CENTERINGS = ("centering", "sinkhorn_knopp")
N_GLOBAL_CROPS = 2


@dataclass
class CropsConfig:
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = 224
    local_crops_size: int = 96


@dataclass
class AugmentConfig:
    """Probabilities and ranges of :class:`~histoscope.pretrain.augment.MultiCropAugment`."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    color_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    hed_jitter: float = 0.5
    hed_sigma: float = 0.05
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (0.0, 0.9, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.2


@dataclass
class StudentConfig:
    drop_path_rate: float = 0.3  # the same in every block (drop_path_uniform)


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class DINOConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1


@dataclass
class IBOTConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class DINOv2Config:
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    centering: str = "centering"  # or sinkhorn_knopp
    export_from: str = "teacher"  # teacher (as DINOv2 evaluates) or student


def _validate(config: DINOv2Config, common) -> None:
    problems = []
    if config.centering not in CENTERINGS:
        problems.append(f"centering must be one of {CENTERINGS}, got {config.centering!r}")
    if config.export_from not in ("teacher", "student"):
        problems.append(f"export_from must be teacher or student, got {config.export_from!r}")
    if config.ibot.loss_weight > 0 and not (max(config.ibot.mask_ratio_min_max) > 0
                                            and config.ibot.mask_sample_probability > 0):
        problems.append("iBOT needs a positive ibot.mask_ratio_min_max and ibot.mask_sample_probability")
    if config.dino.loss_weight <= 0 and config.ibot.loss_weight <= 0:
        problems.append("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))


def _check_crop_sizes(config: DINOv2Config, patch_size: int, encoder: str) -> None:
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(config.crops, name)
        if size % patch_size:
            fit = max(patch_size, round(size / patch_size) * patch_size)
            raise ConfigError(f"crops.{name}={size} is not a multiple of the patch size {patch_size} of "
                              f"{encoder!r}; use crops.{name}={fit}")


def dino_crop_losses(dino_loss: DINOLoss, student_local: torch.Tensor, student_global: torch.Tensor,
                     targets: torch.Tensor, *, n_local: int) -> dict[str, torch.Tensor]:
    """DINOv2's DINO terms, scaled as the reference: every local crop against both teacher global
    crops, each global crop against the other (``targets`` (2, b, K) already swapped); the sum
    over all terms divided by their number ``2 + 2 * n_local`` (DINO's ``n_loss_terms``).

    student_local (n b, K) crop-major, student_global (2b, K).
    """
    n_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + max(n_local * N_GLOBAL_CROPS, 1)
    losses = {}
    if n_local > 0:
        losses["dino_local_crops_loss"] = dino_loss(student_local.float().chunk(n_local), list(targets)) / n_terms
    loss_scales = 2  # both global crops go through the loss as one batch
    losses["dino_global_crops_loss"] = dino_loss([student_global.float()], [targets.flatten(0, 1)]) * loss_scales \
        / n_terms
    return losses


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for the student's trained parameters."""
    pairs = [(t, s) for t, s in zip(teacher.parameters(), student.parameters()) if s.requires_grad]
    teacher_params = [t for t, _ in pairs]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [s.detach() for _, s in pairs], alpha=1 - momentum)


@dataclass(frozen=True)
class DINOv2Collate:
    """Per rank and step: augmented crops (uint8, crop-major as DINOv2 collates) and iBOT masks."""

    augment: MultiCropAugment
    masking: BlockMaskGenerator
    mask_ratio_min_max: tuple[float, float]
    mask_probability: float

    def __call__(self, tiles: list[np.ndarray], *, positions: np.ndarray, step: int, rank: int, world_size: int,
                 seed: int) -> dict[str, Any]:
        crops = [self.augment(tile, seeded_rng(seed, position)) for tile, position in zip(tiles, positions)]
        b = len(tiles)
        global_crops = np.stack([c[0] for c in crops], axis=1)  # (2, b, S, S, 3)
        local_crops = np.stack([c[1] for c in crops], axis=1)  # (n, b, s, s, 3)
        masks = draw_masks(seeded_rng(seed, step, 1), self.masking, n_images=N_GLOBAL_CROPS * b * world_size,
                           mask_ratio_min_max=self.mask_ratio_min_max, mask_probability=self.mask_probability)
        masks = masks.view(N_GLOBAL_CROPS, b * world_size, -1)[:, rank * b : (rank + 1) * b].reshape(
            N_GLOBAL_CROPS * b, -1)  # (2b, N): this rank's images of the global draw
        mask_indices = masks.flatten().nonzero().flatten()
        return {
            "global_crops": _to_chw(global_crops),  # (2b, 3, S, S) uint8
            "local_crops": _to_chw(local_crops),  # (n b, 3, s, s) uint8
            "masks": masks,
            "mask_indices": mask_indices,  # (M,) into masks.flatten()
            "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],  # (M,)
            "n_masked_patches": torch.full((1,), fill_value=len(mask_indices), dtype=torch.long),
        }


def _to_chw(crops: np.ndarray) -> torch.Tensor:
    crops = crops.reshape(-1, *crops.shape[-3:])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()


class DINOv2Student(nn.Module):
    """Backbone + DINO head (+ separate iBOT head): the part trained by gradient (DDP-wrapped)."""

    def __init__(self, *, backbone: MaskedViT, dino_head: DINOHead, ibot_head: DINOHead | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                mask_indices: torch.Tensor) -> dict[str, torch.Tensor]:
        glob = self.backbone(global_crops, masks)
        cls_tokens = [glob["cls"]]  # (2b, C)
        n_local = len(local_crops)
        if n_local:
            cls_tokens.insert(0, self.backbone(local_crops)["cls"])  # (n b, C)
        masked = glob["patch"].flatten(0, 1)[mask_indices]  # (M, C)
        if self.ibot_head is None:
            tokens = self.dino_head(torch.cat(cls_tokens + [masked]))
            masked_out = tokens[len(tokens) - len(masked) :]
        else:
            tokens = self.dino_head(torch.cat(cls_tokens))
            masked_out = self.ibot_head(masked)
        local_out = tokens[: len(cls_tokens[0])] if n_local else tokens[:0]
        global_out = tokens[len(local_out) : len(local_out) + len(glob["cls"])]
        return {"local": local_out, "global": global_out, "masked": masked_out, "backbone_cls": glob["cls"]}


class SelfDistillation(Objective):
    """An objective with an EMA teacher of its student and DINO's teacher schedules: momentum
    (cosine to ``final_momentum_teacher``) and temperature (linear warm-up, then constant)."""

    def _setup_teacher(self, teacher: TeacherConfig, info: RunInfo, *, no_drop_path) -> None:
        self.teacher = copy.deepcopy(self.student)
        no_drop_path(self.teacher)
        self.teacher.requires_grad_(False)
        self.momentum_schedule = cosine_schedule(base_value=teacher.momentum_teacher,
                                                 final_value=teacher.final_momentum_teacher,
                                                 total_iters=info.total_iters)
        warmup = teacher.warmup_teacher_temp_epochs * info.epoch_length
        self.teacher_temp_schedule = cosine_schedule(base_value=teacher.teacher_temp, final_value=teacher.teacher_temp,
                                                     total_iters=warmup, warmup_iters=warmup,
                                                     start_warmup_value=teacher.warmup_teacher_temp)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.momentum_schedule[step])

    def step_stats(self, step: int) -> dict[str, float]:
        return {"mom": self.momentum_schedule[step], "teacher_temp": self.teacher_temp_schedule[step]}


class DINOv2(SelfDistillation, EncoderObjective):
    """Student, EMA teacher, the three losses and their schedules."""

    def __init__(self, *, student: DINOv2Student, config: DINOv2Config, info: RunInfo, encoder: str, arch: dict,
                 spec, optim, tag: str = "dinov2"):
        super().__init__()
        self.student = student
        self._setup_teacher(config.teacher, info, no_drop_path=lambda teacher: teacher.backbone.set_drop_path(0.0))
        self.config, self.info, self.optim = config, info, optim
        self._setup_encoder(spec=spec, encoder=encoder, arch=arch, input_size=config.crops.global_crops_size,
                            tag=tag)
        self.dino_loss = DINOLoss(config.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(config.ibot.head_n_prototypes if config.ibot.separate_head
                                             else config.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()

    def collate(self) -> DINOv2Collate:
        crops, augment = self.config.crops, self.config.augment
        return DINOv2Collate(
            augment=MultiCropAugment(global_size=crops.global_crops_size, global_scale=crops.global_crops_scale,
                                     local_number=crops.local_crops_number, local_size=crops.local_crops_size,
                                     local_scale=crops.local_crops_scale, **asdict(augment)),
            masking=BlockMaskGenerator.for_crops(crop_size=crops.global_crops_size,
                                                 patch_size=self.student.backbone.patch_size),
            mask_ratio_min_max=self.config.ibot.mask_ratio_min_max,
            mask_probability=self.config.ibot.mask_sample_probability,
        )

    @torch.no_grad()
    def _teacher_targets(self, global_crops, batch, teacher_temp):
        cfg = self.config
        out = self.teacher.backbone(global_crops)
        cls = out["cls"].chunk(N_GLOBAL_CROPS)
        cls = torch.cat((cls[1], cls[0]))  # swapped: crop A's student is matched to crop B's teacher
        masked = out["patch"].flatten(0, 1)[batch["mask_indices"]]  # (M, C)
        n_masked = len(masked)
        if self.teacher.ibot_head is None:
            tokens = self.teacher.dino_head(torch.cat([cls, masked])).float()
            cls_out, masked_out = tokens[: len(cls)], tokens[len(cls) :]
        else:
            cls_out = self.teacher.dino_head(cls).float()
            masked_out = self.teacher.ibot_head(masked).float()
        ibot_targets = None
        if cfg.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_out, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_out)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_out, teacher_temp=teacher_temp)
        dino_targets = dino_targets.view(N_GLOBAL_CROPS, -1, *cls_out.shape[1:])  # (2, b, K)
        if cfg.ibot.loss_weight <= 0:  # no iBOT term: its centre is never touched (as the reference's do_ibot)
            return dino_targets, ibot_targets
        if cfg.centering == "centering":
            masked_out = masked_out.unsqueeze(0)  # (1, M, K)
            ibot_targets = self.ibot_patch_loss.softmax_center_teacher(masked_out[:, :n_masked],
                                                                       teacher_temp=teacher_temp).squeeze(0)
            self.ibot_patch_loss.update_center(masked_out[:n_masked])
        else:
            ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                masked_out, teacher_temp=teacher_temp, n_masked_patches_tensor=batch["n_masked_patches"])
        return dino_targets, ibot_targets  # (2, b, K), (M, K)

    def forward(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        global_crops = self.normalize(batch["global_crops"])
        local_crops = self.normalize(batch["local_crops"])
        masks = batch["masks"]
        n_local = cfg.crops.local_crops_number
        do_dino, do_ibot = cfg.dino.loss_weight > 0, cfg.ibot.loss_weight > 0

        dino_targets, ibot_targets = self._teacher_targets(global_crops, batch, self.teacher_temp_schedule[step])
        student = self.run_student(global_crops, local_crops, masks, batch["mask_indices"])
        losses: dict[str, torch.Tensor] = {}
        total = 0
        loss_scales = 2  # both global crops go through the losses as one batch
        if do_dino:
            losses.update(dino_crop_losses(self.dino_loss, student["local"], student["global"], dino_targets,
                                           n_local=n_local))
            total = total + cfg.dino.loss_weight * sum(losses.values())
            if cfg.dino.koleo_loss_weight > 0:
                koleo = cfg.dino.koleo_loss_weight * sum(
                    self.koleo_loss(p) for p in student["backbone_cls"].chunk(N_GLOBAL_CROPS))
                losses["koleo_loss"] = koleo / loss_scales
                total = total + koleo
        if do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                student["masked"].float(), ibot_targets, student_masks_flat=masks,
                n_masked_patches=len(batch["mask_indices"]), masks_weight=batch["masks_weight"],
            ) * loss_scales * (1.0 / N_GLOBAL_CROPS)
            losses["ibot_loss"] = ibot / 2
            total = total + cfg.ibot.loss_weight * ibot
        return {"loss": total, **losses}

    def param_groups(self) -> list[dict]:
        backbone = self.student.backbone
        groups = param_groups(backbone, n_blocks=len(backbone.vit.blocks), lr_decay_rate=self.optim.layerwise_decay,
                              patch_embed_lr_mult=self.optim.patch_embed_lr_mult)
        for head in (self.student.dino_head, self.student.ibot_head):
            if head is not None:
                groups += param_groups(head, n_blocks=0)
        return groups

    def clip_modules(self) -> list[nn.Module]:
        return [m for m in (self.student.backbone, self.student.dino_head, self.student.ibot_head) if m is not None]

    def exported_encoder(self) -> nn.Module:
        return (self.teacher if self.config.export_from == "teacher" else self.student).backbone.model

    def export_note(self) -> dict:
        return {"exported": self.config.export_from}


@register_objective(name="dinov2", description="DINOv2: DINO + iBOT + KoLeo with an EMA teacher (tile encoders)",
                    config=DINOv2Config, validate=_validate)
def build_dinov2(config: DINOv2Config, common, info: RunInfo, *, cls: type | None = None,
                 tag: str = "dinov2") -> DINOv2:
    """The DINOv2 objective (or ``cls``, a subclass sharing its construction, exported under ``tag``)."""
    from histoscope.encoders import load_tile_encoder

    torch.manual_seed(info.seed)  # the same initial student on every rank
    weights = f"random:{info.seed}" if common.weights == "random" else common.weights  # the run's seed draws it
    encoder = load_tile_encoder(common.encoder, weights=weights, **common.arch)
    backbone = MaskedViT(model=encoder.model, encoder=common.encoder)
    _check_crop_sizes(config, backbone.patch_size, common.encoder)
    backbone.set_drop_path(config.student.drop_path_rate)
    dino, ibot = config.dino, config.ibot
    dino_head = DINOHead(in_dim=backbone.embed_dim, out_dim=dino.head_n_prototypes, nlayers=dino.head_nlayers,
                         hidden_dim=dino.head_hidden_dim, bottleneck_dim=dino.head_bottleneck_dim)
    ibot_head = DINOHead(in_dim=backbone.embed_dim, out_dim=ibot.head_n_prototypes, nlayers=ibot.head_nlayers,
                         hidden_dim=ibot.head_hidden_dim, bottleneck_dim=ibot.head_bottleneck_dim) \
        if ibot.separate_head and ibot.loss_weight > 0 else None
    student = DINOv2Student(backbone=backbone, dino_head=dino_head, ibot_head=ibot_head)
    objective = (cls or DINOv2)(student=student, config=config, info=info, encoder=common.encoder,
                                arch=dict(common.arch), spec=encoder.spec, optim=common.optim, tag=tag)
    return objective.to(info.device).train()
