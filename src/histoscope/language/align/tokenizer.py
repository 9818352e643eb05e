"""Captions -> token ids as the text towers expect them, and BPE tokenizers trained on captions.

:class:`TextTokenizer` wraps a Hugging Face fast tokenizer. For a tower that appends a
class token (CoCa, CONCH) it does what CONCH's ``tokenize`` does: add the start and
end tokens, cut at ``context_length − 1`` tokens, pad to that length, then append one
pad as the class token's placeholder -- (B, context_length) ids in all. For other
towers it pads and cuts at ``context_length``.

:func:`train_bpe_tokenizer` builds a tokenizer of CONCH's kind (uncased byte-level BPE,
``<pad>`` = 0, ``<start_of_text>`` = 1, ``<end_of_text>`` = 2) from a list of captions.

Notation: B captions, L = context_length tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "train_bpe_tokenizer"]

# CONCH's special tokens (custom_tokenizer.get_tokenizer), in id order for trained tokenizers
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<start_of_text>", "eos_token": "<end_of_text>"}
_FOLDER_FILES = ("tokenizer.json", "conch_byte_level_bpe_uncased.json")


class TextTokenizer:
    """``tokenizer(texts) -> LongTensor (B, L)``.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
    context_length : int
        The text tower's context length L.
    reserve_cls : bool
        Leave the last position as a pad placeholder for the class token (CoCa towers).
    """

    def __init__(self, tokenizer, *, context_length: int, reserve_cls: bool):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no padding token; set one (tokenizer.pad_token = ...) or use another")
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.reserve_cls = bool(reserve_cls)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        length = self.context_length - 1 if self.reserve_cls else self.context_length
        ids = self.tokenizer(list(texts), max_length=length, add_special_tokens=True, truncation=True,
                             padding="max_length", return_token_type_ids=False, return_tensors="pt")["input_ids"]
        return F.pad(ids, (0, 1), value=self.pad_id) if self.reserve_cls else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer to ``folder`` (``tokenizer.json`` and its settings); loads with :meth:`load`."""
        self.tokenizer.save_pretrained(str(folder))
        return Path(folder)

    @classmethod
    def load(cls, path: str | Path, *, context_length: int, reserve_cls: bool) -> TextTokenizer:
        """From a tokenizer file (CONCH's ``conch_byte_level_bpe_uncased.json``, any
        ``tokenizer.json``: CONCH's special tokens) or a folder (a Hugging Face tokenizer
        folder with ``tokenizer_config.json``, or one holding such a file)."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True),
                           context_length=context_length, reserve_cls=reserve_cls)
            found = [path / name for name in _FOLDER_FILES if (path / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer here (expected tokenizer_config.json or one of "
                                        f"{', '.join(_FOLDER_FILES)}); pass the tokenizer file or folder")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        from transformers import PreTrainedTokenizerFast

        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
        except Exception as error:  # tokenizers raises its own exception types for a bad file
            raise ValueError(f"{path}: not a tokenizers JSON file ({error})") from error
        vocab = tokenizer.get_vocab()
        absent = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
        if absent:
            raise ValueError(f"{path}: the tokenizer lacks {', '.join(absent)}, the special tokens CONCH's tokenizer "
                             "has; pass a tokenizer folder with its own tokenizer_config.json instead")
        return cls(tokenizer, context_length=context_length, reserve_cls=reserve_cls)


def train_bpe_tokenizer(texts: Sequence[str], *, vocab_size: int, special_tokens: dict[str, str] | None = None,
                        template: str | None = None, lowercase: bool = True):
    """An uncased byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on ``texts``.

    Built like CONCH's: NFD + strip accents + lowercase, byte-level pre-tokenisation
    with a prefix space, ``<start_of_text> caption <end_of_text>``. Other models'
    conventions: ``special_tokens`` (Hugging Face role → token, ids in that order),
    ``template`` (a ``tokenizers`` template over them, e.g. BioGPT's ``"</s> $A"``) and
    ``lowercase=False`` for a cased tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = dict(special_tokens or SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    steps = [normalizers.NFD(), normalizers.StripAccents()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(special_tokens.values())  # ids 0, 1, 2, …
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    template = template or f"{special_tokens['bos_token']} $A {special_tokens['eos_token']}"
    used = [token for token in template.split() if token in specials]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, tokenizer.token_to_id(token)) for token in dict.fromkeys(used)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
