"""Language models over slides: report generation (HistoGPT) and the shared decoding loop.

Notation: B slides/prompts, N tiles, D tile feature dim, T tokens, V vocabulary.

``load_report_model(name, weights=..., lm_config=..., resampler_config=...)`` builds a
registered report model; ``model(input_ids (B, T), features (B, N, D), mask (B, N))``
gives ``.logits (B, T, V)`` and ``model.generate(...)`` writes reports.
:mod:`histoscope.language.generation` holds the KV-cached decoding loop (greedy,
sampling, beams) for any Hugging Face-style causal LM.
"""

from histoscope.language.generation import generate, left_pad
from histoscope.language.histogpt import FROM_MODEL, HistoGPT, ReportOutput
from histoscope.language.refine import Refinement, ensemble_refinement
from histoscope.language.registry import (
    ReportModelSpec,
    ReportWeightsError,
    get_report_model_spec,
    list_report_models,
    load_report_model,
    register_report_model,
)

__all__ = ["FROM_MODEL", "HistoGPT", "Refinement", "ReportModelSpec", "ReportOutput", "ReportWeightsError",
           "ensemble_refinement", "generate", "get_report_model_spec", "left_pad", "list_report_models",
           "load_report_model", "register_report_model"]
