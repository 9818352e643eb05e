"""``histoscope serve``: slides, Deep Zoom tiles and a run's outputs over HTTP, with a browser viewer.

:func:`create_app` builds the ASGI app (FastAPI behind :class:`~histoscope.serve.security.Guard`),
:func:`serve` runs it with uvicorn. Needs the ``serve`` extra (``pip install histoscope[serve]``).
"""

from histoscope.serve.deepzoom import DeepZoomGeometry, read_dz_tile

__all__ = ["DeepZoomGeometry", "create_app", "read_dz_tile", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from histoscope.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
