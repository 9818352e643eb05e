"""Slide-level models: tile embeddings (B, N, D) → slide embedding, predictions, tile scores."""

from histoscope.slide.base import SlideModel, SlideOutput
from histoscope.slide.registry import (
    SlideModelSpec,
    SlideWeightsError,
    get_slide_model_spec,
    list_slide_models,
    load_slide_model,
    register_slide_model,
)

__all__ = ["SlideModel", "SlideModelSpec", "SlideOutput", "SlideWeightsError", "get_slide_model_spec",
           "list_slide_models", "load_slide_model", "register_slide_model"]
