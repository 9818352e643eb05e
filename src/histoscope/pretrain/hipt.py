"""HIPT's two DINO levels (Chen et al. 2022, ``mahmoodlab/HIPT`` ``1-Hierarchical-Pretraining``).

* ``hipt256``: DINO on 256-px tiles with a ViT-S/16 over 16-px patches (HIPT's ViT-256),
  2 global 224-px and 8 local 96-px crops. It is the DINOv2 objective with DINO's loss
  alone (no iBOT, no KoLeo) and DINO's hyper-parameters (``recipes/hipt_256*.yaml``);
  the encoder is exported for ``histoscope embed`` like any pretrained tile encoder.
  Deviation: the prototype layer's weight-norm gain is trained, as in DINOv2 (DINO fixes
  it at 1 with ``norm_last_layer``).
* ``hipt4k``: DINO on 4096-px regions, each the 16 x 16 grid of its 256-px tiles'
  embeddings (``main_dino4k.py``): the region ViT is ``vit4k_xs``
  (:class:`~histoscope.slide.models.hipt.VisionTransformer4K`, the ``local_vit`` of the
  ``hipt`` slide model), crops are random 14 x 14 (global, 2) and 6 x 6 (local, 8)
  windows of the grid with horizontal flips (``DataAugmentationDINO4K``), the head is
  DINO's with the gain fixed (``norm_last_layer=True``), the teacher is centred
  (``center_momentum`` 0.9) at temperature 0.04, its momentum goes 0.996 -> 1. Regions
  are built from features files (``histoscope embed`` with the ViT-256) as the ``hipt``
  model builds them; regions with fewer than ``min_region_tiles`` tiles are skipped.
  The export is a DINO checkpoint in HIPT's layout (``vit4k_xs_dino.pth``:
  ``{"teacher": {"backbone.*", "head.*"}, "student": {"module.*"}, ...}``), which
  :func:`histoscope.slide.models.hipt.load_vit4k_dino` loads into a ``hipt`` model.
  Deviation: gradients are clipped per module (DINOv2), not per parameter (DINO).

Notation: b regions per rank, G = 16 tiles per region edge, D tile dim (384), E region
ViT width (192), K prototypes, n local crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoscope.pretrain.backbone import set_drop_path
from histoscope.pretrain.dinov2 import (CENTERINGS, N_GLOBAL_CROPS, DINOConfig, DINOv2, DINOv2Config, IBOTConfig,
                                        SelfDistillation, TeacherConfig, build_dinov2, dino_crop_losses)
from histoscope.pretrain.dinov2 import _validate as _validate_dinov2
from histoscope.pretrain.feature_data import RegionFeatureIndex, find_feature_slides, with_tile_size
from histoscope.pretrain.heads import DINOHead
from histoscope.pretrain.losses import DINOLoss
from histoscope.pretrain.objective import RunInfo, register_objective, seeded_rng
from histoscope.pretrain.optim import param_groups
from histoscope.utils.recipe import ConfigError

__all__ = ["HIPT256", "HIPT4K", "HIPT4KConfig", "HIPT256Config", "RegionCrops", "dino_checkpoint_part",
           "dino_head_state_dict"]


# ---- the 256-px level: DINOv2's objective with DINO's loss only ---------------------------------

# Recipe sections are built from their class's defaults, so DINO's defaults are subclasses.
@dataclass
class DINOTeacherConfig(TeacherConfig):
    """DINO's teacher (``main_dino.py``/``main_dino4k.py`` as HIPT ran them): temperature 0.04, momentum 0.996."""

    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0


@dataclass
class DINOOnlyConfig(DINOConfig):
    koleo_loss_weight: float = 0.0


@dataclass
class NoIBOTConfig(IBOTConfig):
    loss_weight: float = 0.0
    mask_sample_probability: float = 0.0  # DINO: the student sees whole global crops
    separate_head: bool = False


@dataclass
class HIPT256Config(DINOv2Config):
    dino: DINOOnlyConfig = field(default_factory=DINOOnlyConfig)
    ibot: NoIBOTConfig = field(default_factory=NoIBOTConfig)
    teacher: DINOTeacherConfig = field(default_factory=DINOTeacherConfig)


class HIPT256(DINOv2):
    """DINOv2's objective exporting, besides the encoder for ``histoscope embed``, HIPT's own file."""

    def export(self, out_dir: Path) -> Path:
        """The encoder as every tile objective exports it, plus ``OUT/export/vit256_dino.pth``: a DINO
        checkpoint in HIPT's layout (``{"teacher": {"backbone.*", "head.*"}, "student": {"module.*"}}``,
        what HIPT's ``get_vit256`` reads)."""
        from histoscope.io.atomic import atomic_path

        path = super().export(out_dir)
        checkpoint = {"teacher": dino_checkpoint_part(self.teacher.backbone.model, self.teacher.dino_head, ""),
                      "student": dino_checkpoint_part(self.student.backbone.model, self.student.dino_head, "module."),
                      "dino_loss": {"center": self.dino_loss.center.detach().cpu().view(1, -1)}}
        with atomic_path(path.parent / "vit256_dino.pth") as tmp:
            torch.save(checkpoint, tmp)
        return path


@register_objective(name="hipt256", description="HIPT level 1: DINO on 256-px tiles (ViT-S/16, tile encoders)",
                    config=HIPT256Config, validate=_validate_dinov2)
def build_hipt256(config: HIPT256Config, common, info: RunInfo) -> HIPT256:
    return build_dinov2(config, common, info, cls=HIPT256, tag="hipt256")


# ---- the 4096-px level: DINO over grids of tile embeddings -------------------------------------

@dataclass
class RegionCropsConfig:
    global_crops_size: int = 14
    local_crops_number: int = 8
    local_crops_size: int = 6
    hflip: float = 0.5


@dataclass
class RegionHeadConfig:
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    norm_last_layer: bool = True  # DINO's: the prototypes' weight-norm gain fixed at 1


@dataclass
class HIPT4KConfig:
    region_tiles: int = 16
    min_region_tiles: int = 64  # regions with fewer tiles are not sampled
    crops: RegionCropsConfig = field(default_factory=RegionCropsConfig)
    head: RegionHeadConfig = field(default_factory=RegionHeadConfig)
    teacher: DINOTeacherConfig = field(default_factory=DINOTeacherConfig)
    drop_path_rate: float = 0.1
    centering: str = "centering"  # or sinkhorn_knopp


def _validate_4k(config: HIPT4KConfig, common) -> None:
    problems = []
    crops = config.crops
    if not 0 < crops.local_crops_size <= crops.global_crops_size <= config.region_tiles:
        problems.append("need 0 < crops.local_crops_size <= crops.global_crops_size <= region_tiles")
    if config.centering not in CENTERINGS:
        problems.append(f"centering must be one of {CENTERINGS}, got {config.centering!r}")
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))


@dataclass(frozen=True)
class RegionCrops:
    """``DataAugmentationDINO4K``: random square windows of a region grid, each flipped left-right
    with probability ``hflip``; ``crops(grid (G, G, D), rng)`` -> (global (2, D, S, S), local (n, D, s, s))."""

    global_size: int
    local_number: int
    local_size: int
    hflip: float

    def _crop(self, grid: np.ndarray, rng, size: int) -> np.ndarray:
        top = int(rng.integers(0, grid.shape[0] - size + 1))
        left = int(rng.integers(0, grid.shape[1] - size + 1))
        window = grid[top : top + size, left : left + size]
        if rng.random() < self.hflip:
            window = window[:, ::-1]
        return np.ascontiguousarray(window.transpose(2, 0, 1))  # (D, size, size)

    def __call__(self, grid: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        globals_ = np.stack([self._crop(grid, rng, self.global_size) for _ in range(N_GLOBAL_CROPS)])
        locals_ = [self._crop(grid, rng, self.local_size) for _ in range(self.local_number)]
        dim = grid.shape[-1]
        return globals_, (np.stack(locals_) if locals_ else np.zeros((0, dim, self.local_size, self.local_size),
                                                                     np.float32))


@dataclass(frozen=True)
class RegionCollate:
    crops: RegionCrops

    def __call__(self, grids: list[np.ndarray], *, positions: np.ndarray, step: int, rank: int, world_size: int,
                 seed: int) -> dict[str, Any]:
        crops = [self.crops(grid, seeded_rng(seed, position)) for grid, position in zip(grids, positions)]
        global_crops = np.stack([c[0] for c in crops], axis=1)  # (2, b, D, S, S): crop-major, as DINO collates
        local_crops = np.stack([c[1] for c in crops], axis=1)  # (n, b, D, s, s)
        return {"global_crops": torch.from_numpy(global_crops.reshape(-1, *global_crops.shape[2:])),
                "local_crops": torch.from_numpy(local_crops.reshape(-1, *local_crops.shape[2:]))}


class RegionStudent(nn.Module):
    """Region ViT + DINO head (DINO's ``MultiCropWrapper``): crops -> (T, K) prototype scores."""

    def __init__(self, *, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {"global": self.head(self.backbone(global_crops))}  # (2b, K)
        if local_crops is not None and len(local_crops):
            out["local"] = self.head(self.backbone(local_crops))  # (n b, K)
        return out


def dino_head_state_dict(head: DINOHead) -> dict[str, torch.Tensor]:
    """Our :class:`DINOHead` state dict in DINO's key names (``last_layer.weight_g``/``weight_v``)."""
    names = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
             "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
    return {names.get(k, k): v for k, v in head.state_dict().items()}


def dino_checkpoint_part(backbone: nn.Module, head: DINOHead, prefix: str) -> dict[str, torch.Tensor]:
    """DINO's ``MultiCropWrapper`` keys: ``{prefix}backbone.*`` and ``{prefix}head.*`` (CPU tensors)."""
    parts = {f"{prefix}backbone.{k}": v for k, v in backbone.state_dict().items()}
    parts.update({f"{prefix}head.{k}": v for k, v in dino_head_state_dict(head).items()})
    return {k: v.detach().cpu().contiguous() for k, v in parts.items()}


class HIPT4K(SelfDistillation):
    def __init__(self, *, student: RegionStudent, config: HIPT4KConfig, info: RunInfo, model_name: str, in_dim: int,
                 arch: dict, optim):
        super().__init__()
        self.student = student
        self._setup_teacher(config.teacher, info, no_drop_path=lambda teacher: set_drop_path(teacher.backbone.blocks, 0))
        self.config, self.info, self.model_name, self.in_dim, self.arch, self.optim = (
            config, info, model_name, in_dim, dict(arch), optim)
        self.dino_loss = DINOLoss(config.head.head_n_prototypes)

    def collate(self) -> RegionCollate:
        crops = self.config.crops
        return RegionCollate(crops=RegionCrops(global_size=crops.global_crops_size,
                                               local_number=crops.local_crops_number,
                                               local_size=crops.local_crops_size, hflip=crops.hflip))

    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        cls = self.teacher.backbone(global_crops).chunk(N_GLOBAL_CROPS)
        out = self.teacher.head(torch.cat((cls[1], cls[0]))).float()  # swapped: each crop is taught by the other
        if self.config.centering == "centering":
            targets = self.dino_loss.softmax_center_teacher(out, teacher_temp=teacher_temp)
            self.dino_loss.update_center(out)
        else:
            targets = self.dino_loss.sinkhorn_knopp_teacher(out, teacher_temp=teacher_temp)
        return targets.view(N_GLOBAL_CROPS, -1, out.shape[-1])  # (2, b, K)

    def forward(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        global_crops, local_crops = batch["global_crops"].float(), batch["local_crops"].float()
        targets = self._teacher_targets(global_crops, self.teacher_temp_schedule[step])
        student = self.run_student(global_crops, local_crops)
        n_local = self.config.crops.local_crops_number
        losses = dino_crop_losses(self.dino_loss, student.get("local", student["global"][:0]), student["global"],
                                  targets, n_local=n_local)
        return {"loss": sum(losses.values()), **losses}

    def param_groups(self) -> list[dict]:
        backbone = self.student.backbone
        return param_groups(backbone, n_blocks=len(backbone.blocks), lr_decay_rate=self.optim.layerwise_decay,
                            patch_embed_lr_mult=self.optim.patch_embed_lr_mult) + param_groups(self.student.head,
                                                                                               n_blocks=0)

    def clip_modules(self) -> list[nn.Module]:
        return [self.student.backbone, self.student.head]

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("hipt4k trains a region ViT over tile embeddings: it has no tile embedding to probe")

    def export(self, out_dir: Path) -> Path:
        """``OUT/export/vit4k_dino.pth`` in HIPT's DINO-4K layout (``load_vit4k_dino`` loads it) and a JSON note."""
        from histoscope.io.atomic import atomic_path, write_json

        steps = int(self.info.total_iters)
        checkpoint = {"teacher": dino_checkpoint_part(self.teacher.backbone, self.teacher.head, ""),
                      "student": dino_checkpoint_part(self.student.backbone, self.student.head, "module."),
                      "dino_loss": {"center": self.dino_loss.center.detach().cpu().view(1, -1)},
                      "epoch": steps // max(1, self.info.epoch_length)}
        path = Path(out_dir) / "export" / "vit4k_dino.pth"
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        args = ", ".join(f"{k}={v!r}" for k, v in self.arch.items())
        write_json(path.with_suffix(".json"), {
            "slide_model": self.model_name, "in_dim": self.in_dim, "arch": self.arch, "objective": "hipt4k",
            "load": f"model = load_slide_model({self.model_name!r}, in_dim={self.in_dim}"
                    f"{', ' + args if args else ''}); load_vit4k_dino(model, {str(path)!r})"})
        return path


def _region_index(config: HIPT4KConfig, common, log) -> RegionFeatureIndex:
    return RegionFeatureIndex(find_feature_slides(common.data.features, log=log), region_tiles=config.region_tiles,
                              min_tiles=config.min_region_tiles)


@register_objective(name="hipt4k", description="HIPT level 2: DINO on 4096-px regions, a ViT over 16x16 grids of "
                                               "256-px tile embeddings (the hipt model's region ViT)",
                    config=HIPT4KConfig, validate=_validate_4k, inputs="features", index=_region_index)
def build_hipt4k(config: HIPT4KConfig, common, info: RunInfo) -> HIPT4K:
    from histoscope.slide import load_slide_model
    from histoscope.slide.models.hipt import HIPT

    slides = find_feature_slides(common.data.features, log=lambda message: None)
    torch.manual_seed(info.seed)  # the same initial model on every rank
    if common.weights != "random":
        raise ConfigError("hipt4k starts from random weights (weights: random); to continue from a DINO-4K "
                          "checkpoint, load it into the model yourself")
    arch = with_tile_size(common.encoder, common.arch, slides)
    model = load_slide_model(common.encoder, in_dim=slides[0].dim, num_outputs=0, **arch)
    if not isinstance(model, HIPT):
        raise ConfigError(f"hipt4k trains the region ViT of the HIPT slide model (encoder: hipt), not "
                          f"{common.encoder!r}")
    if model.region_tiles != config.region_tiles:
        raise ConfigError(f"region_tiles={config.region_tiles} differs from the model's {model.region_tiles}")
    backbone = model.local_vit
    set_drop_path(backbone.blocks, config.drop_path_rate)
    h = config.head
    head = DINOHead(in_dim=backbone.embed_dim, out_dim=h.head_n_prototypes, nlayers=h.head_nlayers,
                    hidden_dim=h.head_hidden_dim, bottleneck_dim=h.head_bottleneck_dim)
    if h.norm_last_layer:
        head.last_layer.parametrizations.weight.original0.requires_grad_(False)
    objective = HIPT4K(student=RegionStudent(backbone=backbone, head=head), config=config, info=info,
                       model_name=common.encoder, in_dim=slides[0].dim, arch=arch, optim=common.optim)
    return objective.to(info.device).train()
