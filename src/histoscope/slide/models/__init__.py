"""The built-in slide models: one registry entry per published model.

An entry is a builder plus data: a description, the modules that make up the task
head (``head``), the published architecture (``defaults``, the only place those
values are written), a tiny variant for tests, the converter of the authors'
checkpoints and the paper. Builders take every
architecture keyword explicitly and import their model's module only when called,
so this catalogue, and ``histoscope models``, never import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from histoscope.slide.registry import register_slide_model

__all__ = ["PUBLISHED_DILATION_RATIOS", "PUBLISHED_SEGMENT_LENGTHS"]

# Prov-GigaPath's dilated-attention branches (its get_optimal_segment_length for 256-px tiles).
PUBLISHED_SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
PUBLISHED_DILATION_RATIOS = (1, 2, 4, 8, 16)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``histoscope.slide.models.<module>.<name>``, imported on first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


# ---- baselines -------------------------------------------------------------------

@register_slide_model("mean_pool", description="Masked mean of tile embeddings, optional Linear head",
                      head=("head",))
def mean_pool(*, in_dim: int, num_outputs: int):
    from histoscope.slide.models.pooling import MeanPool

    return MeanPool(in_dim=in_dim, num_outputs=num_outputs)


@register_slide_model("max_pool", description="Masked per-dimension max of tile embeddings, optional Linear head",
                      head=("head",))
def max_pool(*, in_dim: int, num_outputs: int):
    from histoscope.slide.models.pooling import MaxPool

    return MaxPool(in_dim=in_dim, num_outputs=num_outputs)


# ---- attention MIL -----------------------------------------------------------------

_ABMIL_PAPER = "Ilse, Tomczak & Welling, Attention-based Deep Multiple Instance Learning, ICML 2018"
_ABMIL_DEFAULTS = {"hidden_dim": 512, "attn_dim": 256, "dropout": 0.25}
_ABMIL_TINY = {"hidden_dim": 32, "attn_dim": 16}


@register_slide_model("abmil", description="Attention MIL, tanh attention (Ilse et al.), CLAM trunk",
                      head=("classifiers",), defaults=_ABMIL_DEFAULTS, tiny=_ABMIL_TINY, convert_checkpoint=_lazy("abmil", "abmil_state_dict"),
                      paper=_ABMIL_PAPER)
def abmil(*, in_dim: int, num_outputs: int, hidden_dim: int, attn_dim: int, dropout: float):
    from histoscope.slide.models.abmil import ABMIL

    return ABMIL(in_dim=in_dim, num_outputs=num_outputs, hidden_dim=hidden_dim, attn_dim=attn_dim, gated=False,
                 dropout=dropout)


@register_slide_model("abmil_gated", description="Gated attention MIL (CLAM_SB without instance loss)",
                      head=("classifiers",), defaults=_ABMIL_DEFAULTS, tiny=_ABMIL_TINY, convert_checkpoint=_lazy("abmil", "abmil_state_dict"),
                      paper=_ABMIL_PAPER)
def abmil_gated(*, in_dim: int, num_outputs: int, hidden_dim: int, attn_dim: int, dropout: float):
    from histoscope.slide.models.abmil import ABMIL

    return ABMIL(in_dim=in_dim, num_outputs=num_outputs, hidden_dim=hidden_dim, attn_dim=attn_dim, gated=True,
                 dropout=dropout)


_CLAM_PAPER = ("Lu et al., Data-efficient and weakly supervised computational pathology on whole-slide images, "
               "Nat. Biomed. Eng. 2021")
# size: CLAM's size_arg, "small" (H 512, A 256) or "big" (A 384); hidden_dim/attn_dim (None) override it.
_CLAM_DEFAULTS = {"size": "small", "hidden_dim": None, "attn_dim": None, "gated": True, "dropout": 0.25,
                  "k_sample": 8, "subtyping": False, "bag_weight": 0.7}
_CLAM_TINY = {"hidden_dim": 32, "attn_dim": 16, "k_sample": 4}
# One attention row per class: the last Linear of the attention net is part of the head
# (attention_c when gated; module.3, or module.2 without dropout, when not).
_CLAM_MB_HEAD = ("classifiers", "instance_classifiers", "attention_net.3.attention_c", "attention_net.3.module.2",
                 "attention_net.3.module.3")


@register_slide_model("clam_sb", description="CLAM single-branch: gated attention MIL + instance clustering",
                      head=("classifiers", "instance_classifiers"), defaults=_CLAM_DEFAULTS, tiny=_CLAM_TINY, convert_checkpoint=_lazy("abmil", "clam_state_dict"),
                      paper=_CLAM_PAPER)
def clam_sb(*, in_dim: int, num_outputs: int, size: str, hidden_dim: int | None, attn_dim: int | None, gated: bool,
            dropout: float, k_sample: int, subtyping: bool, bag_weight: float):
    from histoscope.slide.models.clam import CLAM, clam_widths

    return CLAM(in_dim=in_dim, num_outputs=num_outputs, **clam_widths(size, hidden_dim, attn_dim), gated=gated,
                dropout=dropout, multi_branch=False, k_sample=k_sample, subtyping=subtyping, bag_weight=bag_weight)


@register_slide_model("clam_mb", description="CLAM multi-branch: one attention branch per class + instance clustering",
                      head=_CLAM_MB_HEAD, defaults=_CLAM_DEFAULTS, tiny=_CLAM_TINY, convert_checkpoint=_lazy("abmil", "clam_state_dict"),
                      paper=_CLAM_PAPER)
def clam_mb(*, in_dim: int, num_outputs: int, size: str, hidden_dim: int | None, attn_dim: int | None, gated: bool,
            dropout: float, k_sample: int, subtyping: bool, bag_weight: float):
    from histoscope.slide.models.clam import CLAM, clam_widths

    return CLAM(in_dim=in_dim, num_outputs=num_outputs, **clam_widths(size, hidden_dim, attn_dim), gated=gated,
                dropout=dropout, multi_branch=True, k_sample=k_sample, subtyping=subtyping, bag_weight=bag_weight)


# ---- transformers ------------------------------------------------------------------

@register_slide_model(
    "transmil", description="TransMIL: Nyström-attention transformer with PPEG position encoding", head=("_fc2",),
    # num_landmarks None: dim // 2, as TransMIL
    defaults={"dim": 512, "heads": 8, "num_landmarks": None, "pinv_iterations": 6, "dropout": 0.1,
              "legacy_nystrom_padding": False},
    tiny={"dim": 32, "heads": 4}, convert_checkpoint=_lazy("transmil", "transmil_state_dict"),
    paper="Shao et al., TransMIL: Transformer based Correlated Multiple Instance Learning, NeurIPS 2021")
def transmil(*, in_dim: int, num_outputs: int, dim: int, heads: int, num_landmarks: int | None, pinv_iterations: int,
             dropout: float, legacy_nystrom_padding: bool):
    from histoscope.slide.models.transmil import TransMIL

    return TransMIL(in_dim=in_dim, num_outputs=num_outputs, dim=dim, heads=heads, num_landmarks=num_landmarks,
                    pinv_iterations=pinv_iterations, dropout=dropout, legacy_nystrom_padding=legacy_nystrom_padding)


@register_slide_model(
    "perceiver", description="HistoGPT's Perceiver resampler, mean of latents + Linear head (stage-1 head: our choice)",
    head=("head",),
    defaults={"dim": 1536, "depth": 6, "num_latents": 640, "dim_head": 96, "heads": 16, "ff_mult": 4},
    tiny={"dim": 32, "depth": 2, "num_latents": 8, "dim_head": 8, "heads": 4},
    convert_checkpoint=_lazy("perceiver", "histogpt_resampler_state_dict"),
    paper="Tran et al., Generating dermatopathology reports from gigapixel whole slide images with HistoGPT, "
          "Nat. Commun. 2025")
def perceiver(*, in_dim: int, num_outputs: int, dim: int, depth: int, num_latents: int, dim_head: int, heads: int,
              ff_mult: int):
    from histoscope.slide.models.perceiver import PerceiverMIL

    return PerceiverMIL(in_dim=in_dim, num_outputs=num_outputs, dim=dim, depth=depth, num_latents=num_latents,
                        dim_head=dim_head, heads=heads, ff_mult=ff_mult)


# ---- position-aware: tile_size is the tiles' level-0 edge (TileGeometry.size_level0) --------

@register_slide_model(
    "gigapath_slide",
    description="Prov-GigaPath slide encoder: LongNet dilated attention over tiles with 2-D sin-cos positions",
    head=("head",),
    defaults={"embed_dim": 768, "depth": 12, "num_heads": 16, "mlp_ratio": 4.0,
              "segment_lengths": list(PUBLISHED_SEGMENT_LENGTHS), "dilation_ratios": list(PUBLISHED_DILATION_RATIOS),
              "tile_size": 256, "slide_ngrids": 1000, "global_pool": True, "feat_layers": None,
              "all_layer_embed": False, "dropout": 0.25, "drop_path_rate": 0.1, "count_pad_keys": True},
    tiny={"embed_dim": 32, "depth": 2, "num_heads": 4, "segment_lengths": [8, 16], "dilation_ratios": [1, 2]},
    convert_checkpoint=_lazy("longnet", "gigapath_state_dict"),
    paper="Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024")
def gigapath_slide(*, in_dim: int, num_outputs: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                   segment_lengths: list[int], dilation_ratios: list[int], tile_size: float, slide_ngrids: int,
                   global_pool: bool, feat_layers: list[int] | None, all_layer_embed: bool, dropout: float,
                   drop_path_rate: float, count_pad_keys: bool):
    """``gigapath_slide_enc12l768d``; keywords as :class:`~histoscope.slide.models.longnet.LongNetSlideEncoder`."""
    from histoscope.slide.models.longnet import LongNetSlideEncoder

    return LongNetSlideEncoder(
        in_dim=in_dim, num_outputs=num_outputs, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, segment_lengths=segment_lengths, dilation_ratios=dilation_ratios, tile_size=tile_size,
        slide_ngrids=slide_ngrids, global_pool=global_pool, feat_layers=feat_layers, all_layer_embed=all_layer_embed,
        dropout=dropout, drop_path_rate=drop_path_rate, count_pad_keys=count_pad_keys)


@register_slide_model(
    "hipt", description="HIPT: ViT-4K over 16x16 grids of 256-px tile embeddings, then a slide transformer "
                        "with gated attention pooling (HIPT_LGP_FC)",
    head=("classifier",),
    defaults={"tile_size": 256, "region_tiles": 16, "embed_dim": 192, "local_depth": 6, "local_heads": 6,
              "global_depth": 2, "global_heads": 3, "dropout": 0.25, "local_drop_rate": 0.0},
    tiny={"embed_dim": 32, "local_depth": 1, "local_heads": 2, "global_depth": 1, "global_heads": 2},
    convert_checkpoint=_lazy("hipt", "hipt_state_dict"),
    paper="Chen et al., Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised "
          "Learning, CVPR 2022")
def hipt(*, in_dim: int, num_outputs: int, tile_size: float, region_tiles: int, embed_dim: int, local_depth: int,
         local_heads: int, global_depth: int, global_heads: int, dropout: float, local_drop_rate: float):
    """``HIPT_LGP_FC(size_arg="small")``; keywords as :class:`~histoscope.slide.models.hipt.HIPT`."""
    from histoscope.slide.models.hipt import HIPT

    return HIPT(in_dim=in_dim, num_outputs=num_outputs, tile_size=tile_size, region_tiles=region_tiles,
                embed_dim=embed_dim, local_depth=local_depth, local_heads=local_heads, global_depth=global_depth,
                global_heads=global_heads, dropout=dropout, local_drop_rate=local_drop_rate)
