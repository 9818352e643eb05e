"""``histoscope train-report``: HistoGPT's two training stages on slides and their reports."""

from histoscope.train.report.config import ReportConfig, Stage1Config, load_report_recipe
from histoscope.train.report.run import train_report

__all__ = ["ReportConfig", "Stage1Config", "load_report_recipe", "train_report"]
