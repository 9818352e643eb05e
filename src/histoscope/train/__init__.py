"""Training slide-level models on tile features: recipes, patient-level CV, resumable runs."""

from histoscope.train.compare import compare_runs
from histoscope.train.config import ConfigError, SurvivalConfig, TrainConfig, apply_overrides, load_recipe
from histoscope.train.data import BagDataset, FeatureCache, Sample, read_table
from histoscope.train.losses import cox_loss, discrete_time_nll, time_bins
from histoscope.train.run import train
from histoscope.train.splits import Split, make_splits
from histoscope.train.tasks import make_task

__all__ = [
    "BagDataset", "ConfigError", "compare_runs", "FeatureCache", "Sample", "Split", "SurvivalConfig", "TrainConfig",
    "apply_overrides", "cox_loss", "discrete_time_nll", "load_recipe", "make_splits", "make_task", "read_table",
    "time_bins", "train",
]
