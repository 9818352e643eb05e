"""Zero-shot classification from class prompts, as CONCH evaluates it.

Each class has one or more names and every name is put into every template (the
placeholder ``CLASSNAME``); the class's weight is the mean of those prompts'
L2-normalised text embeddings, renormalised (``zero_shot_classifier`` in CONCH's
``downstream/zeroshot_path.py``). An image's class scores are the cosine similarities
of its normalised embedding with the class weights.

Notation: C classes, E joint embedding dim, P prompts of a class (names × templates).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["PLACEHOLDER", "ClassPrompts", "zero_shot_classifier", "encode_texts"]

PLACEHOLDER = "CLASSNAME"


@dataclass(frozen=True)
class ClassPrompts:
    """``classnames``: class label -> its names; ``templates``: texts with ``CLASSNAME`` in them."""

    classnames: Mapping[str, Sequence[str]]
    templates: Sequence[str] = (f"{PLACEHOLDER}.",)

    def __post_init__(self):
        if not self.classnames:
            raise ValueError("class prompts need at least one class")
        empty = [label for label, names in self.classnames.items() if not names]
        if empty:
            raise ValueError(f"classes without a name: {', '.join(map(str, empty))}")
        missing = [t for t in self.templates if PLACEHOLDER not in t]
        if not self.templates or missing:
            raise ValueError(f"every template must contain {PLACEHOLDER} (got {list(self.templates)!r})")

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in self.classnames]

    def prompts(self, label: str) -> list[str]:
        """Every name of ``label`` in every template (names outer, templates inner)."""
        return [t.replace(PLACEHOLDER, name) for name in self.classnames[label] for t in self.templates]

    @classmethod
    def from_labels(cls, labels: Sequence[str], templates: Sequence[str] | None = None) -> ClassPrompts:
        """Each label as its own class name."""
        return cls({str(label): [str(label)] for label in labels}, tuple(templates or cls.templates))

    @classmethod
    def from_file(cls, path: str | Path) -> ClassPrompts:
        """A JSON or YAML file ``{classnames: {label: [names]}, templates: [...]}``; CONCH's
        prompt files (the same under a key ``"0"``) are read as they are."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such prompts file")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if isinstance(data, Mapping) and "classnames" not in data and len(data) == 1:
            data = next(iter(data.values()))  # CONCH's {"0": {...}}
        if not isinstance(data, Mapping) or not isinstance(data.get("classnames"), Mapping):
            raise ValueError(f"{path}: expected {{classnames: {{label: [names]}}, templates: [...]}}")
        classnames = {str(k): [v] if isinstance(v, str) else list(v) for k, v in data["classnames"].items()}
        try:
            return cls(classnames, tuple(data.get("templates") or cls.templates))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (n, E) in float32, ``batch_size`` texts at a time."""
    device = next(model.parameters()).device
    chunks = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, prompts: ClassPrompts) -> torch.Tensor:
    """Class weights (E, C), one unit column per class in ``prompts.labels`` order.

    Examples
    --------
    >>> weights = zero_shot_classifier(model, tokenizer, ClassPrompts({"tumor": ["tumor", "carcinoma"],
    ...                                "stroma": ["stroma"]}, ["an image of CLASSNAME."]))  # doctest: +SKIP
    >>> scores = model.encode_image(images) @ weights                                     # doctest: +SKIP
    """
    columns = []
    for label in prompts.labels:
        embeddings = encode_texts(model, tokenizer, prompts.prompts(label))  # (P, E), unit rows
        columns.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(columns, dim=1)  # (E, C)
