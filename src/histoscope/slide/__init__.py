"""Slide-level models: tile embeddings (B, N, D) → slide embedding, predictions, tile scores.

The registry names are importable without torch (``histoscope models`` lists them in
an instant); the modules behind them are imported on first use.
"""

from histoscope.slide.registry import (
    SlideModelSpec,
    SlideWeightsError,
    get_slide_model_spec,
    list_slide_models,
    load_slide_model,
    register_slide_model,
)

__all__ = ["SlideModel", "SlideModelSpec", "SlideOutput", "SlideWeightsError", "TrainedModel", "collate_bags",
           "get_slide_model_spec", "list_slide_models", "load_slide_model", "load_trained_model",
           "register_slide_model"]

_LAZY = {"SlideModel": "base", "SlideOutput": "base", "TrainedModel": "trained", "load_trained_model": "trained",
         "collate_bags": "bags"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
