"""histoscope: computational pathology foundation models, from gigapixel slide to report.

The top-level names are the entry points users script against; each stage also has
its own subpackage (``histoscope.io``, ``.tissue``, ``.tiling``, ``.encoders``,
``.slide``, ``.language``, ``.pipeline``).
"""

from histoscope.io import MissingMppError, Slide, SlideError, open_slide

__version__ = "0.1.0"

__all__ = ["MissingMppError", "Slide", "SlideError", "embed_slide", "load_report_model", "load_slide_model",
           "load_tile_encoder", "open_slide", "__version__"]


def load_tile_encoder(name, *, weights=None, **kwargs):
    """Build a registered tile encoder and load its weights strictly (see
    :func:`histoscope.encoders.load_tile_encoder`); imported lazily so that reading
    slides does not import torch."""
    from histoscope.encoders import load_tile_encoder as _load

    return _load(name, weights=weights, **kwargs)


def load_slide_model(name, *, weights=None, **kwargs):
    """Build a registered slide model (see :func:`histoscope.slide.load_slide_model`)."""
    from histoscope.slide import load_slide_model as _load

    return _load(name, weights=weights, **kwargs)


def load_report_model(name, *, weights=None, lm_config=None, resampler_config=None, **arch):
    """Build a registered report model, e.g. HistoGPT, and load its weights strictly (see
    :func:`histoscope.language.load_report_model`); imported lazily (transformers)."""
    from histoscope.language import load_report_model as _load

    return _load(name, weights=weights, lm_config=lm_config, resampler_config=resampler_config, **arch)


def embed_slide(slide, encoder, **kwargs):
    """Tissue → tiles → embeddings for one slide in memory (see
    :func:`histoscope.pipeline.embed_slide`)."""
    from histoscope.pipeline.embed import embed_slide as _embed

    return _embed(slide, encoder, **kwargs)
