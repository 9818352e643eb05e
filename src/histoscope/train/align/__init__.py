"""Training image–text models (CLIP/CoCa, CONCH fine-tuning) on pair tables: ``histoscope train-align``."""

from histoscope.train.align.config import AlignConfig, load_align_recipe
from histoscope.train.align.run import assign_splits, read_splits, splits_path, train_align

__all__ = ["AlignConfig", "assign_splits", "load_align_recipe", "read_splits", "splits_path", "train_align"]
