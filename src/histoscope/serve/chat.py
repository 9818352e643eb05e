"""The chat hook: how ``POST /api/slides/{id}/chat`` reaches a chat model.

A chat backend is any callable ``chat(slide_id, question, history) -> answer`` where
``history`` is the conversation so far as ``(question, answer)`` pairs, oldest first;
:func:`~histoscope.serve.app.create_app` takes one (``chat=``) and the route answers
501 without it. :func:`load_chat_backend` builds one from a run of ``histoscope
train-chat`` and the slide's features in OUT, through the language package's assistant
(``histoscope.language.chat``); a histoscope without that package says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["ChatBackend", "ChatUnavailable", "load_chat_backend"]

ChatBackend = Callable[[str, str, list[tuple[str, str]]], str]


class ChatUnavailable(LookupError):
    """The chat model cannot answer about this slide (no features for it)."""


def _features_file(out_dir: Path, slide_id: str, encoder: str | None) -> Path:
    from histoscope.io.features_h5 import features_folder, features_path

    folders = [features_folder(out_dir, encoder)] if encoder else sorted(out_dir.glob("features_*"))
    for folder in folders:
        path = features_path(folder, slide_id)
        if path.is_file() and path.resolve().is_relative_to(out_dir.resolve()):
            return path
    raise ChatUnavailable(f"no features file of slide {slide_id!r} in OUT/features_*; run histoscope embed "
                          "with the chat model's encoder first")


def load_chat_backend(run: str | Path, out_dir: str | Path, *, encoder: str | None = None,
                      device: str = "auto") -> ChatBackend:
    """A chat backend over the assistant trained in ``run``, fed each slide's features from OUT.

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
    assistant = Assistant.load(run, device=device)
    out_dir = Path(out_dir)

    def answer(slide_id: str, question: str, history: list[tuple[str, str]]) -> str:
        features = _features_file(out_dir, slide_id, encoder)
        return assistant.ask([question], features=features, history=history)[0]

    return answer
