"""Zero-shot evaluation of an image–text model on a pair table: classification from class
prompts and text↔image retrieval.

``OUT/metrics.json`` holds both; ``OUT/predictions.csv`` one row per image with its
label, the predicted class and the probability of each class
(``softmax(exp(logit_scale) · cosine)``, as CONCH reports them).

Notation: n pairs, E joint embedding dim, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscope.eval.cross_modal import image_text_retrieval
from histoscope.eval.metrics import classification_metrics
from histoscope.io.atomic import write_json
from histoscope.io.columns import write_columns
from histoscope.io.pairs import read_pairs
from histoscope.language.align.data import PairInputs, embed_pairs
from histoscope.language.align.trained import TrainedAlignModel, load_align_run
from histoscope.language.align.zeroshot import ClassPrompts, zero_shot_classifier
from histoscope.train.align.run import read_splits, splits_path
from histoscope.utils.device import resolve_device, resolve_dtype

__all__ = ["zeroshot_eval", "zeroshot_classify"]

SPLIT_CHOICES = ("train", "val", "test", "all")


def zeroshot_classify(image_embeddings: torch.Tensor, classifier: torch.Tensor,
                      logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cosine scores (n, C), probabilities (n, C))`` of L2-normalised images against class weights (E, C)."""
    scores = image_embeddings.float() @ classifier.float()
    return scores.numpy(), torch.softmax(logit_scale * scores, dim=1).numpy()


def _select(table: Path, pairs, split: str, run_dir: Path | None, run_table: str | None):
    """The pairs of ``split``: as the run assigned them for its own table, else by the table's split column."""
    if split == "all":
        return pairs, "all rows"
    if run_dir is not None and run_table and Path(run_table).resolve() == table.resolve() \
            and splits_path(run_dir).is_file():
        roles = read_splits(run_dir)
        return [p for p in pairs if roles.get(p.row) == split], str(splits_path(run_dir))
    if any(p.split is not None for p in pairs):
        return [p for p in pairs if p.split == split], "the split column"
    raise ValueError(f"{table}: no split column and not the run's own table, so split {split!r} is undefined; "
                     "use --split all, or add a split column")


def zeroshot_eval(run: str | Path | TrainedAlignModel, *, pairs: str | Path | None = None, split: str = "test",
                  prompts: ClassPrompts | str | Path | None = None, out_dir: str | Path | None = None,
                  batch_size: int = 64, device: str = "auto", precision: str = "fp32",
                  ks: Sequence[int] = (1, 5, 10), log=None) -> dict[str, Any]:
    """Zero-shot classification and retrieval of a trained run on one split of a pair table.

    Parameters
    ----------
    run : a ``train-align`` output folder, its ``model.pt``, or a loaded :class:`TrainedAlignModel`.
    pairs : pair table; default the run's own (then its ``splits.csv`` defines the splits).
    split : ``train``, ``val``, ``test`` or ``all``.
    prompts : class prompts (or a JSON/YAML file of them); default each ``label`` as its
        own class name in the template ``"CLASSNAME."``. Without prompts and labels only
        retrieval is computed.
    out_dir : where ``metrics.json`` and ``predictions.csv`` go; default ``RUN/zeroshot_<split>``.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
    log = log or (lambda message: None)
    device = resolve_device(device)
    trained = run if isinstance(run, TrainedAlignModel) else load_align_run(run, device=device)
    run_dir = None if isinstance(run, TrainedAlignModel) else (Path(run) if Path(run).is_dir() else Path(run).parent)
    run_table = trained.meta.get("config", {}).get("pairs")
    table = Path(pairs or run_table or "")
    if not str(table) or not table.is_file():
        raise FileNotFoundError(f"{table}: no pair table; pass one (--pairs)")
    rows, problems = read_pairs(table)
    rows, source = _select(table, rows, split, run_dir, run_table)
    inputs, unreadable = PairInputs(rows).check()
    for problem in problems + unreadable:
        log(f"skipped {problem}")
    if len(inputs) == 0:
        raise ValueError(f"{table}: no usable pairs in split {split!r} (selected by {source})")
    model, tokenizer = trained.model.to(device), trained.tokenizer
    dtype = resolve_dtype(None if precision == "auto" else precision, device)
    ids = tokenizer([p.caption for p in inputs.pairs])
    images, texts = embed_pairs(model, inputs, ids, batch_size=batch_size, device=device, dtype=dtype)
    results: dict[str, Any] = {"pairs": str(table), "split": split, "selected_by": source, "n": len(inputs),
                               "retrieval": image_text_retrieval(images.numpy(), texts.numpy(), ks=ks)}
    out = Path(out_dir) if out_dir is not None else (run_dir or Path(".")) / f"zeroshot_{split}"
    labels = [p.label for p in inputs.pairs]
    if isinstance(prompts, (str, Path)):
        prompts = ClassPrompts.from_file(prompts)
    if prompts is None and all(label is not None for label in labels):
        prompts = ClassPrompts.from_labels(sorted(set(labels)))
    if prompts is not None:
        results["classification"] = _classify(model, tokenizer, prompts, images, inputs, out, table)
    write_json(out / "metrics.json", results)
    return results


def _classify(model, tokenizer, prompts: ClassPrompts, images, inputs, out: Path, table: Path) -> dict[str, Any]:
    with torch.no_grad():
        classifier = zero_shot_classifier(model, tokenizer, prompts).cpu()
    scores, probs = zeroshot_classify(images, classifier, float(model.logit_scale.detach().exp()))
    classes = prompts.labels
    predicted = [classes[i] for i in scores.argmax(1)]
    columns = {"row": [p.row for p in inputs.pairs], "label": [p.label or "" for p in inputs.pairs],
               "prediction": predicted, **{f"prob_{c}": probs[:, i].tolist() for i, c in enumerate(classes)}}
    write_columns(out / "predictions.csv", columns)
    labelled = [i for i, p in enumerate(inputs.pairs) if p.label is not None]
    unknown = sorted({inputs.pairs[i].label for i in labelled} - set(classes))
    if unknown:
        raise ValueError(f"{table}: labels {', '.join(unknown)} have no class prompts (classes: {', '.join(classes)})")
    result: dict[str, Any] = {"classes": classes, "templates": list(prompts.templates), "n_labelled": len(labelled),
                              "chance": 1 / len(classes)}
    if labelled:
        y_true = np.array([classes.index(inputs.pairs[i].label) for i in labelled])
        result["metrics"] = {"accuracy": float(np.mean(scores[labelled].argmax(1) == y_true)),
                             **classification_metrics(y_true, probs[labelled])}
    return result
