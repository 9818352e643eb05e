"""Text ↔ token ids for the assistant: a Hugging Face tokenizer folder, or a byte-level BPE
trained on the conversations (for a language model built from scratch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ChatTokenizer", "train_chat_tokenizer"]

_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class ChatTokenizer:
    """``encode(text) -> ids`` without special tokens, ``decode(ids) -> text``, and the
    ``bos``/``eos``/``pad`` ids (a tokenizer without a padding token pads with its end token,
    as LLaVA does for Llama-2: padded positions are masked anyway)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no begin- or end-of-sequence token; a chat template needs both")
        self.tokenizer = tokenizer

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if i >= 0], skip_special_tokens=True).strip()

    def save(self, folder: str | Path) -> Path:
        self.tokenizer.save_pretrained(str(folder))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> ChatTokenizer:
        """From a Hugging Face tokenizer folder (a Llama-2 or BioGPT snapshot, or one :meth:`save` wrote)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder (a Hugging Face model or tokenizer folder)")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder}: no tokenizer that transformers can read here ({str(error).splitlines()[0]}); "
                             "pass the folder holding tokenizer.json / tokenizer_config.json") from None
        return cls(tokenizer)


def train_chat_tokenizer(texts: Iterable[str], *, vocab_size: int) -> ChatTokenizer:
    """A cased byte-level BPE with ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` (ids 0–3) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIALS.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return ChatTokenizer(PreTrainedTokenizerFast(tokenizer_object=tokenizer, **_SPECIALS))
