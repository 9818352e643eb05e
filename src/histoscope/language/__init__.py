"""Language models over pathology images: report generation (HistoGPT), the shared decoding
loop, image–text alignment (:mod:`histoscope.language.align`: CLIP/CoCa, CONCH) and chat
assistants (:mod:`histoscope.language.chat`: PathChat/LLaVA-style).

Notation: B slides/prompts, N tiles, D tile feature dim, T tokens, V vocabulary.

``load_report_model(name, weights=..., lm_config=..., resampler_config=...)`` builds a
registered report model; ``model(input_ids (B, T), features (B, N, D), mask (B, N))``
gives ``.logits (B, T, V)`` and ``model.generate(...)`` writes reports.
:mod:`histoscope.language.generation` holds the KV-cached decoding loop (greedy,
sampling, beams) for any Hugging Face-style causal LM.

The registry names are importable without torch; the modules behind them are
imported on first use.
"""

from histoscope.language.registry import (
    ReportModelSpec,
    ReportWeightsError,
    get_report_model_spec,
    list_report_models,
    load_report_model,
    register_report_model,
)

__all__ = ["DecodeState", "FROM_MODEL", "HistoGPT", "Refinement", "ReportModelSpec", "ReportOutput", "ReportWeightsError",
           "ensemble_refinement", "generate", "get_report_model_spec", "left_pad", "list_report_models",
           "load_report_model", "register_report_model"]

_LAZY = {"DecodeState": "generation", "FROM_MODEL": "histogpt", "HistoGPT": "histogpt", "ReportOutput": "histogpt", "Refinement": "refine",
         "ensemble_refinement": "refine", "generate": "generation", "left_pad": "generation"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
