"""``Assistant.ask``: multi-turn answers about a slide or a tile, greedy and KV-cached.

Notation: B conversations, N image tokens in, D their width, K image tokens in the LM,
E LM width, T tokens so far.

A conversation keeps the LM's KV cache from turn to turn
(:class:`~histoscope.language.generation.DecodeState`): a new question costs only its
own tokens and its answer, never the earlier turns or the image again. Several images
asked the same questions are one batch: each row is its own conversation, left-padded,
and the rows that finish an answer early are padded and masked out of the later turns,
so every row is answered as it would be alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from histoscope.io.pairs import IMAGE_SUFFIXES
from histoscope.language.chat.model import ChatModel
from histoscope.language.chat.template import ChatTemplate, get_template
from histoscope.language.chat.tokenizer import ChatTokenizer
from histoscope.language.generation import DecodeState, greedy_or_sample, left_pad

__all__ = ["Assistant", "Conversation", "ImageInput", "image_tokens_of"]

ImageInput = str | Path | np.ndarray | Tensor | None


def image_tokens_of(image: ImageInput, *, encoder: nn.Module | None = None) -> Tensor | None:
    """One image's tokens ``(N, D)`` float32: a features file (``.h5``, its N tiles), a tile
    image file or uint8 array ``(H, W, 3)`` (the tile encoder's patch tokens), a features
    array ``(N, D)``; None for a text-only conversation."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.suffix.lower() in (".h5", ".hdf5"):
            from histoscope.io.features_h5 import check_finite, read_features

            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such features file")
            features, _, _ = read_features(path)
            if len(features) == 0:
                raise ValueError(f"{path}: no tiles in this features file; nothing to look at")
            check_finite(path, features)
            return torch.from_numpy(features)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such image file")
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
        else:
            raise ValueError(f"{path}: neither a features file (.h5) nor a tile image "
                             f"({', '.join(IMAGE_SUFFIXES)})")
    array = torch.as_tensor(np.array(image)) if not isinstance(image, Tensor) else image
    if array.ndim == 2:
        return array.float()
    if array.ndim == 3 and array.shape[-1] == 3:
        if encoder is None:
            raise ValueError("a tile image needs the tile encoder the assistant was trained with; this assistant "
                             "reads features files only")
        pixels = encoder.transform(array[None].numpy() if isinstance(array, Tensor) else array[None])
        with torch.no_grad():
            return encoder.patch_tokens(pixels.to(next(encoder.parameters()).device))[0].float().cpu()
    raise ValueError(f"an image is a features array (N, D) or an RGB tile (H, W, 3), got shape {tuple(array.shape)}")


class _WithImages(nn.Module):
    """The chat model with a batch's image tokens bound, in the LM call convention the
    decoding loop expects (it fills the placeholders wherever a call has them)."""

    def __init__(self, model: ChatModel, image_embeds: Tensor | None):
        super().__init__()
        self.model = model
        self.image_embeds = image_embeds

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, use_cache: bool = False):
        return self.model(input_ids, attention_mask, position_ids, cache=cache, use_cache=use_cache,
                          image_embeds=self.image_embeds)


class Conversation:
    """B conversations advanced together, one question per row per :meth:`ask`.

    ``keep_cache`` False re-encodes the whole conversation every turn (the baseline the
    benchmark compares the cache with); the answers are the same.
    """

    def __init__(self, assistant: Assistant, images: Sequence[ImageInput], *, keep_cache: bool = True):
        self.assistant = assistant
        self.batch = len(images)
        tokens = [image_tokens_of(image, encoder=assistant.encoder) for image in images]
        self.has_image = [t is not None for t in tokens]
        self.image_embeds, self.num_image_tokens = assistant.embed_images([t for t in tokens if t is not None])
        self.keep_cache = keep_cache
        self.state = DecodeState()
        self.ids: Tensor | None = None  # (B, T)
        self.mask: Tensor | None = None  # (B, T): 0 for padding, also between turns
        self.ended = [True] * self.batch  # each row's last answer ended with the end token
        self.turns: list[list[tuple[str, str]]] = [[] for _ in range(self.batch)]

    def ask(self, questions: str | Sequence[str], *, max_new_tokens: int | None = None) -> list[str]:
        """The next question of each row (one string: the same for every row) → answers."""
        questions = [questions] * self.batch if isinstance(questions, str) else list(questions)
        if len(questions) != self.batch:
            raise ValueError(f"{len(questions)} questions for {self.batch} conversations")
        a = self.assistant
        tok, template = a.tokenizer, a.template
        first = self.ids is None
        segments = []
        for row, question in enumerate(questions):
            head = template.start(tok) if first else ([] if self.ended[row] else [tok.eos_token_id])
            k = self.num_image_tokens if first and self.has_image[row] else 0
            segments.append(head + template.human(tok, question, image_tokens=k))
        new_ids, new_mask = left_pad(segments, pad_token_id=tok.pad_token_id, device=a.device)
        ids = new_ids if first else torch.cat([self.ids, new_ids], dim=1)
        mask = new_mask if first else torch.cat([self.mask, new_mask], dim=1)
        state = self.state
        if not self.keep_cache:  # the whole conversation again, compacted and left-padded
            ids, mask = left_pad([row[m.bool()].tolist() for row, m in zip(ids, mask)],
                                 pad_token_id=tok.pad_token_id, device=a.device)
            state = None
        out = greedy_or_sample(_WithImages(a.model, self.image_embeds), ids, mask,
                               max_new_tokens=max_new_tokens or a.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, state=state)
        generated = out[:, ids.shape[1]:]  # (B, n)
        answers, keep = [], torch.zeros_like(generated)
        for row in range(self.batch):
            tokens = generated[row].tolist()
            length = tokens.index(tok.eos_token_id) + 1 if tok.eos_token_id in tokens else len(tokens)
            self.ended[row] = length > 0 and tokens[length - 1] == tok.eos_token_id
            keep[row, :length] = 1
            answers.append(tok.decode(tokens[:length]))
            self.turns[row].append((questions[row], answers[-1]))
        self.ids, self.mask = torch.cat([ids, generated], dim=1), torch.cat([mask, keep], dim=1)
        return answers


class Assistant:
    """A trained chat model with its tokenizer, template and (for tile images) tile encoder.

    Examples
    --------
    >>> assistant = Assistant.load("runs/chat")                                    # doctest: +SKIP
    >>> assistant.ask("features/slide_1.h5", ["What is the diagnosis?", "Is there necrosis?"])  # doctest: +SKIP
    ['The diagnosis is melanoma.', 'Necrosis is present.']
    """

    def __init__(self, model: ChatModel, tokenizer: ChatTokenizer, template: ChatTemplate, *,
                 encoder: nn.Module | None = None, max_new_tokens: int = 128):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.encoder = encoder
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, run: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             encoder_weights: str | None = None, max_new_tokens: int = 128) -> Assistant:
        """A ``histoscope train-chat`` run folder (or its ``model.pt``); ``encoder_weights``
        replaces the recorded weights of the tile encoder used for tile images."""
        from histoscope.language.chat.trained import chat_model_path, chat_tokenizer_path, load_chat_model

        run = Path(run)
        model_file = chat_model_path(run) if run.is_dir() else run
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no trained assistant here; pass the output folder of "
                                    "histoscope train-chat")
        model, meta = load_chat_model(model_file, device=device, dtype=dtype)
        tokenizer = ChatTokenizer.load(chat_tokenizer_path(model_file.parent))
        encoder = None
        if meta.get("encoder"):
            from histoscope.encoders import load_tile_encoder

            info = meta["encoder"]
            encoder = load_tile_encoder(info["name"], weights=encoder_weights or info.get("weights"), device=device,
                                        **info.get("arch", {}))
        return cls(model, tokenizer, get_template(meta["template"]), encoder=encoder, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def embed_images(self, tokens: Sequence[Tensor]) -> tuple[Tensor | None, int]:
        """Image tokens ``[(N_i, D)]`` → LM-space tokens ``(n, K, E)`` and K (padded, masked)."""
        if not tokens:
            return None, 0
        width = max(len(t) for t in tokens)
        batch = torch.zeros(len(tokens), width, tokens[0].shape[-1])
        mask = torch.zeros(len(tokens), width, dtype=torch.bool)
        for row, t in enumerate(tokens):
            batch[row, :len(t)], mask[row, :len(t)] = t, True
        embeds = self.model.image_tokens(batch.to(self.device), mask.to(self.device))
        return embeds, embeds.shape[1]

    def conversation(self, images: Sequence[ImageInput], *, keep_cache: bool = True) -> Conversation:
        """Start one conversation per image (None: text only); :meth:`Conversation.ask` continues them."""
        return Conversation(self, list(images), keep_cache=keep_cache)

    def ask(self, image: ImageInput, questions: str | Sequence[str], *, max_new_tokens: int | None = None
            ) -> list[str]:
        """Answer ``questions`` in order as one conversation about ``image`` (each turn sees
        the earlier questions and answers); greedy decoding."""
        return self.ask_batch([image], questions, max_new_tokens=max_new_tokens)[0]

    def ask_batch(self, images: Sequence[ImageInput], questions: str | Sequence[str], *,
                  max_new_tokens: int | None = None) -> list[list[str]]:
        """The same questions, one conversation per image, batched: ``answers[image][turn]``."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        conversation = self.conversation(images)
        for question in questions:
            conversation.ask(question, max_new_tokens=max_new_tokens)
        return [[answer for _, answer in turns] for turns in conversation.turns]
