"""Report text ↔ token ids the way HistoGPT reads and writes them.

HistoGPT uses BioGPT's tokenizer, which starts every encoded text with ``</s>`` (id 2)
and ends a report with the same token: the prompt is ``tokenizer("Final diagnosis:")``
and generation stops at ``</s>``. A tokenizer trained here for a model built from
scratch (:func:`train_report_tokenizer`) follows the same convention and BioGPT's
special-token ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3), so a
``BioGptConfig``'s default token ids fit either.

Notation: T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_PROMPT", "REPORT_SPECIAL_TOKENS", "decode_report", "load_report_tokenizer", "prompt_ids",
           "report_ids", "token_config", "train_report_tokenizer"]

DEFAULT_PROMPT = "Final diagnosis:"  # the reference's prompt
# BioGPT's special tokens, in id order
REPORT_SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_report_tokenizer(texts: Sequence[str], *, vocab_size: int):
    """A cased byte-level BPE tokenizer trained on ``texts`` with BioGPT's special tokens
    and its ``</s> text`` encoding (``PreTrainedTokenizerFast``)."""
    from histoscope.language.align.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size=vocab_size, special_tokens=REPORT_SPECIAL_TOKENS,
                               template=f"{REPORT_SPECIAL_TOKENS['eos_token']} $A", lowercase=False)


def load_report_tokenizer(folder: str | Path):
    """A Hugging Face tokenizer from a local folder (BioGPT's, or one a run saved)."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer here (no tokenizer_config.json); pass a Hugging Face "
                                "tokenizer folder (e.g. a local copy of microsoft/biogpt) or a train-report run")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no end or padding token; HistoGPT needs both")
    return tokenizer


def token_config(tokenizer) -> dict[str, int]:
    """The ``BioGptConfig`` fields a tokenizer fixes: vocabulary size and special-token ids."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return {"vocab_size": len(tokenizer), "pad_token_id": int(tokenizer.pad_token_id),
            "bos_token_id": int(bos), "eos_token_id": int(tokenizer.eos_token_id)}


def prompt_ids(tokenizer, prompt: str = DEFAULT_PROMPT) -> list[int]:
    """The prompt as the model starts from it (BioGPT: ``</s>`` first)."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    return list(ids)


def report_ids(tokenizer, report: str) -> list[int]:
    """A report's tokens as they follow the prompt, ending with the end token (T,)."""
    return list(tokenizer(" " + report.strip(), add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def decode_report(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids (after the prompt) → text, cut at the first end token."""
    ids = list(ids)
    end = tokenizer.eos_token_id
    if end in ids:
        ids = ids[:ids.index(end)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
