"""histoscope: computational pathology foundation models, from gigapixel slide to report."""

from histoscope.io import MissingMppError, Slide, SlideError, open_slide

__version__ = "0.1.0"

__all__ = ["MissingMppError", "Slide", "SlideError", "open_slide", "__version__"]
