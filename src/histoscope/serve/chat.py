"""The chat hook: how ``POST /api/slides/{id}/chat`` reaches a chat model.

A chat backend is any callable ``chat(slide_id, question, history) -> answer`` where
``history`` is the conversation so far as ``(question, answer)`` pairs, oldest first;
:func:`~histoscope.serve.app.create_app` takes one (``chat=``) and the route answers
501 without it. :func:`load_chat_backend` builds one from a run of ``histoscope
train-chat`` and the slide's features in OUT, through the language package's assistant
(``histoscope.language.chat``); a histoscope without that package says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["ChatBackend", "ChatUnavailable", "load_chat_backend"]

ChatBackend = Callable[[str, str, list[tuple[str, str]]], str]


class ChatUnavailable(LookupError):
    """The chat model cannot answer about this slide: no features for it (HTTP ``status`` 404), or
    features it cannot read (422: damaged, empty, another encoder's width)."""

    def __init__(self, message: str, *, status: int = 404):
        super().__init__(message)
        self.status = status


def _features_file(out_dir: Path, slide_id: str, encoder: str | None) -> Path:
    from histoscope.io.features_h5 import features_folder, features_path

    folders = [features_folder(out_dir, encoder)] if encoder else sorted(out_dir.glob("features_*"))
    for folder in folders:
        path = features_path(folder, slide_id)
        if path.is_file() and path.resolve().is_relative_to(out_dir.resolve()):
            return path
    raise ChatUnavailable(f"no features file of slide {slide_id!r} in OUT/features_*; run histoscope embed "
                          "with the chat model's encoder first")


def _check_features(path: Path, out_dir: Path, dim: int) -> None:
    from histoscope.io.features_h5 import FeaturesError, check_features

    name = f"OUT/{path.relative_to(out_dir)}"
    try:
        _, width = check_features(path)
    except FeaturesError as error:  # the reason without the server's absolute path
        reason = str(error).removeprefix(f"{error.path}: ")
        raise ChatUnavailable(f"{name} cannot be used by the chat model: {reason}", status=422) from None
    if width != dim:
        raise ChatUnavailable(f"{name} holds {width}-dim features; the chat model reads {dim}-dim ones: embed the "
                              "slide with its encoder (or pick that features folder: serve --chat-encoder)",
                              status=422)


def load_chat_backend(run: str | Path, out_dir: str | Path, *, encoder: str | None = None,
                      device: str = "auto") -> ChatBackend:
    """A chat backend over the assistant trained in ``run``, fed each slide's features from OUT
    (``OUT/features_<encoder>/<slide>.h5``; without ``encoder``, the first features folder that has
    the slide).

    The assistant decodes greedily, so replaying the earlier questions of a conversation gives
    the answers it gave them; the conversation is asked again with the new question last. One
    question is answered at a time.

    Raises
    ------
    RuntimeError
        This histoscope has no chat models (``histoscope.language.chat``).
    """
    try:
        from histoscope.language.chat import Assistant
    except ImportError:
        raise RuntimeError(f"{run}: this histoscope has no chat models (histoscope.language.chat); install a "
                           "version with histoscope train-chat, or start serve without --chat") from None
    from histoscope.utils.device import resolve_device

    assistant = Assistant.load(run, device=resolve_device(device))
    out_dir = Path(out_dir)
    lock = threading.Lock()

    def answer(slide_id: str, question: str, history: list[tuple[str, str]]) -> str:
        features = _features_file(out_dir, slide_id, encoder)
        _check_features(features, out_dir, assistant.model.image_dim)
        with lock:
            return assistant.ask(features, [q for q, _ in history] + [question])[-1]

    return answer
