"""``histoscope train-align`` and ``histoscope zeroshot``: image–text models on pair tables.

Wired into the main app by ``register(app)``; torch is imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.recipes import list_option

__all__ = ["register"]


def train_align(
    recipe: Annotated[Optional[str], typer.Argument(
        help="Recipe name (see --list), e.g. align_tiny, or a YAML file.", show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value overrides, dotted for sections: pairs=PAIRS.csv epochs=20 model_args.decoder_layers=2",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (recipe's out_dir).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 (recipe's device).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in the output folder instead of resuming it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    list_: Annotated[bool, typer.Option("--list", is_eager=True,
                                        callback=list_option("histoscope.train.align", "train-align"),
                                        help="List the shipped recipes and exit.")] = False,
) -> None:
    """Train an image–text model (CLIP/CoCa, or fine-tune CONCH) on a CSV of images or features files and captions.

    A rerun into the same folder resumes an interrupted run from its last epoch.
    """
    from histoscope.train.align import load_align_recipe
    from histoscope.train.align import train_align as run_training

    items = list(overrides or [])
    if recipe is not None and "=" in str(recipe):  # no recipe file, overrides only
        items, recipe = [str(recipe), *items], None
    config = load_align_recipe(recipe, items)
    if out is not None:
        config.out_dir = str(out)
    if device is not None:
        config.device = device
    result = run_training(config, overwrite=overwrite, log=None if quiet else typer.echo, progress=not quiet)
    best = result["best_epoch"]
    typer.echo(f"model: {result['model']} (best epoch {best + 1 if best >= 0 else 'initial weights'})")


def zeroshot(
    run: Annotated[Path, typer.Argument(help="A train-align output folder (or its model.pt).")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", "-p", help="Pair table (default: the run's own).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Class prompts, JSON or YAML {classnames: {label: [names]}, templates: [...CLASSNAME...]} (CONCH's prompt files work); default: the labels.")] = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default RUN/zeroshot_<split>).")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto.")] = "fp32",
) -> None:
    """Zero-shot classification from class prompts and text↔image retrieval (Recall@1/5/10)."""
    from histoscope.eval.zeroshot import zeroshot_eval

    results = zeroshot_eval(run, pairs=pairs, split=split, prompts=prompts, out_dir=out, batch_size=batch_size,
                            device=device, precision=precision, log=typer.echo)
    typer.echo(f"{results['n']} pairs ({results['split']}, selected by {results['selected_by']})")
    classification = results.get("classification", {})
    for name, value in classification.get("metrics", {}).items():
        typer.echo(f"  {name:24s} {value:.4f}")
    if classification:
        typer.echo(f"  {'chance':24s} {classification['chance']:.4f}")
    for name, value in results["retrieval"].items():
        typer.echo(f"  {name:24s} {value:.4f}")


def register(app: typer.Typer) -> None:
    """Add the ``train-align`` and ``zeroshot`` commands to ``app``."""
    app.command("train-align")(train_align)
    app.command("zeroshot")(zeroshot)
