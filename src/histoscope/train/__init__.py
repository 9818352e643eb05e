"""Training slide-level models on tile features: recipes, patient-level CV, resumable runs."""

from histoscope.train.compare import compare_runs
from histoscope.train.checkpoint import TrainedModel, load_trained_model, save_checkpoint
from histoscope.train.config import ConfigError, SurvivalConfig, TrainConfig, apply_overrides, load_recipe
from histoscope.train.data import BagDataset, FeatureCache, Sample, collate_bags, read_table
from histoscope.train.losses import cox_loss, discrete_time_nll, time_bins
from histoscope.train.run import train
from histoscope.train.splits import Split, make_splits
from histoscope.train.tasks import make_task, task_from_meta

__all__ = [
    "BagDataset", "ConfigError", "compare_runs", "FeatureCache", "Sample", "Split", "SurvivalConfig", "TrainConfig",
    "TrainedModel", "apply_overrides", "collate_bags", "cox_loss", "discrete_time_nll", "load_recipe",
    "load_trained_model", "make_splits", "make_task", "read_table", "save_checkpoint", "task_from_meta",
    "time_bins", "train",
]
