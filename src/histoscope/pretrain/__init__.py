"""Self-supervised pretraining: ``histoscope pretrain OBJECTIVE RECIPE.yaml``.

The trainer (:func:`pretrain`) is generic: it streams tiles from slides (or tile
embeddings from features files), runs on one process or under ``torchrun``, checkpoints
and resumes mid-epoch, logs, probes a labelled tile set, and exports. A method is an
:class:`Objective` registered with :func:`register_objective`. Built in: ``dinov2`` (its
losses under their reference names), ``mae`` (tile encoders), ``slide_mae`` (the LongNet
slide encoder, Prov-GigaPath's second stage), ``hipt256`` and ``hipt4k`` (HIPT's levels).
"""

from histoscope.pretrain.config import PretrainConfig, Recipe, load_pretrain_recipe
from histoscope.pretrain.heads import DINOHead
from histoscope.pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from histoscope.pretrain.objective import Objective, RunInfo, get_objective, list_objectives, register_objective
from histoscope.pretrain.trainer import pretrain

__all__ = [
    "DINOHead", "DINOLoss", "KoLeoLoss", "Objective", "PretrainConfig", "Recipe", "RunInfo", "get_objective",
    "iBOTPatchLoss", "list_objectives", "load_pretrain_recipe", "pretrain", "register_objective",
]
