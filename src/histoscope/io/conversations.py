"""Instruction data in the LLaVA JSON format: a list of conversations about images.

::

    [{"id": "slide_1", "image": "slide_1",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is the diagnosis?"},
                        {"from": "gpt", "value": "Melanoma."}, …]}, …]

``image`` is a slide id (its features file ``FEATURES_DIR/<id>.h5``), a features file or
image path (relative to ``images_dir``, else to the JSON file's folder), or absent for a
text-only conversation. Turns alternate ``human``/``gpt``, starting with ``human``
(LLaVA also writes ``user``/``assistant``; a leading ``system`` turn is ignored, the
template has its own).

An item that cannot be used (no answer, turns out of order, a missing file) is
reported in one line naming the file, the item and the fix, and left out; the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from histoscope.io.features_h5 import features_path
from histoscope.io.pairs import FEATURES_SUFFIXES, IMAGE_SUFFIXES

__all__ = ["Conversation", "read_conversations", "resolve_image"]

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One usable item: ``turns`` = [(question, answer), …]; ``image`` a file, or None (text only)."""

    id: str
    image: Path | None
    turns: tuple[tuple[str, str], ...]


def resolve_image(value: str, *, features_dir: str | Path | None, images_dir: str | Path | None,
                  base: Path) -> Path:
    """An item's ``image`` value → the file: a features file or image path, else a slide id in ``features_dir``."""
    if value.lower().endswith(IMAGE_SUFFIXES + FEATURES_SUFFIXES):
        path = Path(value)
        return path if path.is_absolute() else Path(images_dir or base) / path
    if features_dir is None:
        raise ValueError(f"image {value!r} is a slide id but no features_dir was given; pass features_dir=DIR "
                         "(the folder of <slide id>.h5 files)")
    return features_path(features_dir, value)


def _turns(item: dict) -> tuple[tuple[str, str], ...]:
    messages = [m for m in item.get("conversations") or [] if not (isinstance(m, dict) and m.get("from") == "system")]
    if not messages:
        raise ValueError("no conversations")
    turns = []
    for i in range(0, len(messages), 2):
        pair = messages[i : i + 2]
        if not all(isinstance(m, dict) and isinstance(m.get("value"), str) for m in pair):
            raise ValueError(f"turn {i}: each message is {{\"from\": ..., \"value\": \"text\"}}")
        if pair[0].get("from") not in _HUMAN:
            raise ValueError(f"message {i} is from {pair[0].get('from')!r} where a human question belongs "
                             "(turns alternate human, gpt)")
        if len(pair) < 2 or pair[1].get("from") not in _GPT:
            raise ValueError(f"question {i // 2 + 1} has no gpt answer after it (turns alternate human, gpt)")
        if not pair[1]["value"].strip():
            raise ValueError(f"answer {i // 2 + 1} is empty")
        turns.append((pair[0]["value"], pair[1]["value"]))
    return tuple(turns)


def read_conversations(path: str | Path, *, features_dir: str | Path | None = None,
                       images_dir: str | Path | None = None, check_files: bool = True
                       ) -> tuple[list[Conversation], list[str]]:
    """``(usable conversations, one line per item left out)`` of a LLaVA JSON file.

    Raises
    ------
    FileNotFoundError, ValueError
        The file is missing, is not JSON, or is not a list of conversations.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such conversations file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({error}); write the conversations in LLaVA's JSON "
                         "format (a list of {\"id\", \"image\", \"conversations\"})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a conversations file is a JSON list of {{\"id\", \"image\", \"conversations\"}} "
                         f"items, got a {type(data).__name__}")
    items, problems = [], []
    for index, item in enumerate(data):
        name = str(item.get("id", index)) if isinstance(item, dict) else str(index)
        try:
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            turns = _turns(item)
            image = None
            if item.get("image"):
                image = resolve_image(str(item["image"]), features_dir=features_dir, images_dir=images_dir,
                                      base=path.parent)
                if check_files and not image.is_file():
                    raise FileNotFoundError(f"no file {image}; embed the slide or fix the image path")
            items.append(Conversation(name, image, turns))
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"{path}: item {index} (id {name}): {error}")
    if not items:
        detail = f" ({problems[0]}{' …' if len(problems) > 1 else ''})" if problems else ""
        raise ValueError(f"{path}: no usable conversation{detail}")
    return items, problems
