"""``histoscope serve OUT --slides DIR``: the slide viewer and its API over a run's output folder.

Wired into the main app by ``register(app)``; FastAPI and uvicorn (the ``serve`` extra)
are imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import fail

__all__ = ["register"]


def serve(
    out: Annotated[Path, typer.Argument(help="A run's output folder (histoscope tile/embed/predict/report outputs).")],
    slides: Annotated[list[Path], typer.Option("--slides", help="Folder of slides (repeatable); nothing outside these is opened.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="HISTOSCOPE_SERVE_TOKEN", show_envvar=True, help="Required on /api and /dzi (Authorization: Bearer TOKEN or ?token=TOKEN); the variable keeps it out of the process list.")] = None,
    chat: Annotated[Optional[Path], typer.Option(help="A histoscope train-chat run: enables POST /api/slides/{id}/chat.")] = None,
    chat_encoder: Annotated[Optional[str], typer.Option(help="Features the chat model reads: OUT/features_<name> (default: the first folder with the slide).")] = None,
    rate_limit: Annotated[float, typer.Option(min=0, help="Requests per second per client (0: no limit).")] = 200.0,
    cache_mb: Annotated[int, typer.Option(min=0, help="Memory for encoded tiles, MB.")] = 256,
) -> None:
    """Serve the slides as Deep Zoom tiles with tissue, tile grid, heatmaps, top tiles and reports, and a viewer at /."""
    from histoscope.serve.app import is_loopback

    if not out.is_dir():
        fail(f"{out}: no such output folder; pass the folder histoscope tile/predict wrote (OUT)")
    for root in slides:
        if not root.is_dir():
            fail(f"{root}: no such slide folder (--slides); pass a folder that holds slides")
    if not is_loopback(host) and not token:
        fail(f"--host {host} is reachable from other machines; add --token TOKEN (or bind 127.0.0.1)")
    try:
        from histoscope.serve.app import serve as run_server
    except ImportError as error:
        fail(f"histoscope serve needs FastAPI and uvicorn ({error.name} is missing): pip install 'histoscope[serve]'")
    backend = None
    if chat is not None:
        from histoscope.serve.chat import load_chat_backend

        try:
            backend = load_chat_backend(chat, out, encoder=chat_encoder)
        except RuntimeError as error:
            fail(str(error))
    typer.echo(f"serving {out} with slides from {', '.join(map(str, slides))} on http://{host}:{port}/"
               + ("?token=…" if token else ""))
    run_server(out, list(slides), host=host, port=port, token=token, chat=backend, rate=rate_limit,
               cache_bytes=cache_mb << 20)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    app.command("serve")(serve)
