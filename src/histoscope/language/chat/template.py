"""The conversation template: LLaVA's v1 ("vicuna_v1") format, as token-id segments.

::

    <s>SYSTEM USER: <image tokens>\\nQ1 ASSISTANT: A1</s> USER: Q2 ASSISTANT: A2</s> …

A conversation is tokenised segment by segment (the system prompt, each human turn,
each answer), never as one string, so the prompt the assistant sees at inference is
token for token the one it was trained on, and the answers' positions — the only ones
in the loss — are known exactly. The image stands where the human text says
``<image>`` (LLaVA's placeholder; at the start of the first turn if no turn says it), as
``K`` copies of :data:`IMAGE_TOKEN_INDEX`, which the model replaces by the K projected
image tokens (LLaVA's ``IMAGE_TOKEN_INDEX``, outside every vocabulary).

Notation: K image tokens, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_INDEX", "TEMPLATES", "ChatTemplate", "get_template"]

IMAGE_TOKEN_INDEX = -200  # LLaVA's id for an image position
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # label value left out of the loss


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format as data: the system prompt, the role names, the separators.

    ``tokenizer`` below is any object with ``encode(text) -> list[int]`` (no special
    tokens added), ``bos_token_id`` and ``eos_token_id``
    (:class:`~histoscope.language.chat.tokenizer.ChatTokenizer`).
    """

    name: str
    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "

    def start(self, tokenizer) -> list[int]:
        """``<s>SYSTEM``: what every conversation begins with."""
        return [tokenizer.bos_token_id, *tokenizer.encode(self.system)]

    def human(self, tokenizer, text: str, *, image_tokens: int = 0) -> list[int]:
        """`` USER: text ASSISTANT:``; with ``image_tokens`` K, the image (K placeholders) where
        ``text`` says ``<image>``, else before it (``<image>\\n`` as LLaVA writes it)."""
        ids = tokenizer.encode(f"{self.sep}{self.user}: ")
        if image_tokens:
            before, sep, after = text.partition(IMAGE_PLACEHOLDER)
            if not sep:
                before, after = "", "\n" + text
            if before.strip():
                ids += tokenizer.encode(before)
            ids += [IMAGE_TOKEN_INDEX] * image_tokens
            text = after
        else:
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        return ids + tokenizer.encode(text) + tokenizer.encode(f"{self.sep}{self.assistant}:")

    def answer(self, tokenizer, text: str) -> list[int]:
        """`` A</s>``: an answer as the model learns to write it (every id is a label)."""
        return [*tokenizer.encode(f"{self.sep}{text.strip()}"), tokenizer.eos_token_id]

    def encode(self, tokenizer, turns: Sequence[tuple[str, str]], *, image_tokens: int = 0
               ) -> tuple[list[int], list[int]]:
        """A whole conversation, ``[(question, answer), …]`` → ``(ids, labels)`` of length T,
        ``labels`` the answers' ids and :data:`IGNORE_INDEX` elsewhere."""
        ids = self.start(tokenizer)
        labels = [IGNORE_INDEX] * len(ids)
        for turn, (question, answer) in enumerate(turns):
            prompt = self.human(tokenizer, question, image_tokens=image_tokens if turn == 0 else 0)
            reply = self.answer(tokenizer, answer)
            ids += prompt + reply
            labels += [IGNORE_INDEX] * len(prompt) + reply
        return ids, labels

    def texts(self) -> list[str]:
        """The template's own words (for training a tokenizer that covers them)."""
        return [self.system, f"{self.sep}{self.user}: ", f"{self.sep}{self.assistant}:"]


_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = {
    "llava_v1": ChatTemplate("llava_v1", system=_LLAVA_SYSTEM),
    # the same format with a one-word system prompt: short sequences for tiny CPU models
    "plain": ChatTemplate("plain", system="Pathology assistant."),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
