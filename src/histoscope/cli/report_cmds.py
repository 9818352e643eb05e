"""Slides → pathology reports: ``histoscope train-report`` (HistoGPT's two training stages),
``report`` (generation from features files) and ``eval-reports`` (BLEU-4, ROUGE-L, METEOR,
keyword and diagnosis match). ``register(app)`` adds them; torch loads when one runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import BATCH_FAILED, one_of
from histoscope.cli.recipes import list_option, recipe_and_overrides

__all__ = ["register"]


def train_report(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe name (see --list: histogpt_tiny, histogpt_1b) or a YAML file.", show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value overrides: reports=REPORTS.csv features_dir=DIR out=RUN epochs=30 train_lm=true",
        show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 (recipe's device).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in the output folder instead of resuming it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    list_: Annotated[bool, typer.Option("--list", is_eager=True, callback=list_option("histoscope.train.report", "train-report"),
                                        help="List the shipped recipes and exit.")] = False,
) -> None:
    """Train a report model (HistoGPT) on a CSV of slide reports and a features folder.

    Stage 1: the resampler as a MIL classifier of the label column; stage 2: the report
    decoder by teacher forcing after the prompt. A rerun into the same folder resumes.
    """
    from histoscope.train.report import load_report_recipe
    from histoscope.train.report import train_report as run_training

    config = load_report_recipe(*recipe_and_overrides(recipe, overrides))
    if device is not None:
        config.device = device
    result = run_training(config, overwrite=overwrite, log=None if quiet else typer.echo, progress=not quiet)
    best = result["best_epoch"]
    typer.echo(f"model: {Path(config.out_dir)} (best epoch {best + 1 if best >= 0 else '-'}); "
               f"write reports with `histoscope report FEATURES --model {config.out_dir} --out OUT`")


def report(
    features: Annotated[list[str], typer.Argument(help="Features files (.h5), folders of them, or CSVs with a features column.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="A train-report folder, its model.pt, or published HistoGPT weights.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder (required for published weights: BioGPT's).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt the report continues (default: the model's, \"Final diagnosis:\").")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Longest report in tokens (default: up to 256).")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (with --temperature/--top-k/--top-p) instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Sample from the smallest set of tokens reaching this probability.")] = None,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams (1: greedy or sampling).")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Slides per generate call.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    precision: Annotated[str, typer.Option(callback=one_of("auto", "fp32", "bf16", "fp16"), help="fp32, bf16, fp16 or auto.")] = "fp32",
    heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also write each word's attention over the tiles (OUT/<slide>/words/: CSV and QuPath GeoJSON).")] = False,
) -> None:
    """Write a pathology report for every slide: OUT/reports.csv, reports.json and <slide>.txt."""
    from histoscope.predict.report import DecodeSettings, reports_path, write_reports

    settings = DecodeSettings(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, num_beams=num_beams, seed=seed)
    result = write_reports(features, model=model, out_dir=out, tokenizer=tokenizer, prompt=prompt, settings=settings,
                           batch_size=batch_size, device=device, precision=precision, heatmaps=heatmaps)
    typer.echo(f"{len(result.reports)} report(s) written; {reports_path(out)}")
    for name, error in result.failed.items():
        typer.secho(f"FAILED {name}: {error}", fg=typer.colors.RED, err=True)
    if result.failed:
        raise typer.Exit(BATCH_FAILED)


def eval_reports(
    references: Annotated[Path, typer.Argument(help="Reference reports: CSV slide_id, report[, label] (several rows: several references).")],
    generated: Annotated[Path, typer.Argument(help="Generated reports: CSV slide_id, report (histoscope report's reports.csv).")],
    keywords: Annotated[Optional[str], typer.Option(help="Comma-separated keywords (or a file, one per line) for the keyword match.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the metrics as JSON here.")] = None,
) -> None:
    """BLEU-4, ROUGE-L, METEOR and keyword/diagnosis match of generated against reference reports."""
    from histoscope.eval.report_metrics import evaluate_reports
    from histoscope.io.atomic import write_json

    words = None
    if keywords:
        path = Path(keywords)
        text = path.read_text() if path.is_file() else keywords
        words = [w.strip() for w in text.replace("\n", ",").split(",") if w.strip()]
    result = evaluate_reports(references, generated, keywords=words)
    typer.echo(f"{result['n']} slides" + (f" ({len(result['missing'])} without a generated report)"
                                          if result["missing"] else ""))
    for name in ("bleu4", "rouge_l", "meteor", "keyword_precision", "keyword_recall", "keyword_f1", "keyword_exact",
                 "diagnosis_match"):
        if name in result:
            value = result[name]
            typer.echo(f"  {name:18s} {'n/a' if value is None else f'{value:.4f}'}")
    for note in result["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if out is not None:
        write_json(out, result)


def register(app: typer.Typer) -> None:
    """Add the ``train-report``, ``report`` and ``eval-reports`` commands to ``app``."""
    app.command("train-report")(train_report)
    app.command("report")(report)
    app.command("eval-reports")(eval_reports)
