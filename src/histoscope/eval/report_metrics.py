"""``histoscope eval-reports``: generated reports against reference reports.

Metrics, each from a maintained library where one exists:

- BLEU-4: corpus BLEU of ``sacrebleu`` (its 13a tokenisation, case-sensitive), every
  reference of a slide used; 0–100.
- ROUGE-L: ``rouge-score``'s LCS F-measure (lower-cased, stemmed), the best
  reference per slide, averaged over slides; 0–1.
- METEOR: ``nltk``'s ``meteor_score`` (exact, Porter-stem and WordNet-synonym matches),
  averaged over slides; 0–1. It needs NLTK's WordNet data; without it the value is
  None and ``notes`` says why (nothing is downloaded).
- Keyword match: with a keyword list, the keywords found in each reference and each
  generated report (case-insensitive, whole words) give micro-averaged precision,
  recall and F1, and the share of slides whose keyword sets agree exactly.
- Diagnosis match: with a ``label`` column in the references (the diagnosis), the
  share of slides whose generated report names it.

References: CSV ``slide_id, report`` (several rows of a slide: several references),
optional ``label``. Generated: CSV ``slide_id, report`` (``histoscope report``'s
``reports.csv``). Slides are matched by ``slide_id``; only slides in both count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histoscope.io.columns import table_reader

__all__ = ["bleu4", "diagnosis_match", "evaluate_reports", "keyword_match", "meteor", "read_report_table",
           "rouge_l", "wordnet_or_reason"]


def read_report_table(path: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``({slide_id: [reports]}, {slide_id: label})`` of a report CSV."""
    reader = table_reader(path, required=("slide_id", "report"), what="report table")
    reports: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    for row in reader:
        slide_id = (row["slide_id"] or "").strip()
        if not slide_id:
            continue
        reports.setdefault(slide_id, []).append((row["report"] or "").strip())
        label = (row.get("label") or "").strip()
        if label:
            labels[slide_id] = label
    return reports, labels


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu, 0–100); ``references[i]`` are hypothesis i's references."""
    import sacrebleu

    streams = max(len(r) for r in references)
    ref_streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(streams)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), ref_streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, best reference per slide)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return sum(scores) / len(scores)


def wordnet_or_reason():
    """``(wordnet, None)`` when NLTK's WordNet data is installed, else ``(None, why)``."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet, None
    except LookupError:
        return None, ("METEOR not computed: NLTK's WordNet data is not installed and is not downloaded here; "
                      "install it once where a network is allowed (python -m nltk.downloader wordnet) or "
                      "point NLTK_DATA at a copy")


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, wordnet) -> float:
    """Mean METEOR (nltk, default parameters α 0.9, β 3, γ 0.5) over slides; words are
    the lower-cased runs of letters and digits."""
    from nltk.translate.meteor_score import meteor_score

    def words(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    scores = [meteor_score([words(r) for r in refs], words(hyp), wordnet=wordnet)
              for hyp, refs in zip(hypotheses, references)]
    return sum(scores) / len(scores)


def _found(text: str, keywords: Sequence[str]) -> set[str]:
    text = text.lower()
    return {k for k in keywords if re.search(r"(?<!\w)" + re.escape(k.lower()) + r"(?!\w)", text)}


def keyword_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                  keywords: Sequence[str]) -> dict[str, float]:
    """Micro precision/recall/F1 of the keywords named, and the share of exact keyword-set
    agreement; a slide's reference keywords are those of any of its references."""
    tp = fp = fn = exact = 0
    for hyp, refs in zip(hypotheses, references):
        truth = set().union(*(_found(r, keywords) for r in refs))
        said = _found(hyp, keywords)
        tp, fp, fn = tp + len(truth & said), fp + len(said - truth), fn + len(truth - said)
        exact += truth == said
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"keyword_precision": precision, "keyword_recall": recall, "keyword_f1": f1,
            "keyword_exact": exact / len(hypotheses)}


def diagnosis_match(hypotheses: Sequence[str], labels: Sequence[str]) -> float:
    """Share of reports naming their slide's diagnosis (case-insensitive, whole words)."""
    return sum(bool(_found(h, [label])) for h, label in zip(hypotheses, labels)) / len(hypotheses)


def evaluate_reports(references: str | Path, generated: str | Path, *,
                     keywords: Sequence[str] | None = None, wordnet: Any = "nltk") -> dict[str, Any]:
    """All metrics for the slides in both tables.

    ``wordnet``: ``"nltk"`` (NLTK's data if installed), or an object with ``synsets(word)``,
    or None (no METEOR).
    """
    refs, labels = read_report_table(references)
    generated_reports, _ = read_report_table(generated)
    common = [s for s in refs if s in generated_reports]
    if not common:
        raise ValueError(f"{generated}: no slide_id in common with {references}; compare reports of the same slides")
    hyps = [generated_reports[s][0] for s in common]
    ref_lists = [refs[s] for s in common]
    notes = []
    result: dict[str, Any] = {"n": len(common), "missing": sorted(set(refs) - set(generated_reports)),
                              "bleu4": bleu4(hyps, ref_lists), "rouge_l": rouge_l(hyps, ref_lists)}
    if wordnet == "nltk":
        wordnet, why = wordnet_or_reason()
        if why:
            notes.append(why)
    result["meteor"] = meteor(hyps, ref_lists, wordnet=wordnet) if wordnet is not None else None
    if keywords:
        result.update(keyword_match(hyps, ref_lists, keywords))
    if labels:
        with_label = [i for i, s in enumerate(common) if s in labels]
        result["diagnosis_match"] = diagnosis_match([hyps[i] for i in with_label],
                                                    [labels[common[i]] for i in with_label])
    result["notes"] = notes
    return result
