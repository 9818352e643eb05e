"""``histoscope train`` and ``histoscope predict``: slide-level models on tile features.

Wired into the main app by ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import BATCH_FAILED, check_mpp, one_of
from histoscope.cli.executor_opts import AddressOpt, ExecutorOpt, gpus_per_task, ray_or_none
from histoscope.cli.recipes import list_option

__all__ = ["register"]


def train(
    recipe: Annotated[Optional[str], typer.Argument(
        help="Recipe name (see --list), e.g. abmil_classification, or a YAML file.", show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value overrides, dotted for sections: epochs=30 survival.loss=discrete model_args.dropout=0.1",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (recipe's out_dir).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 (recipe's device).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in the output folder instead of resuming it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-epoch lines.")] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    list_: Annotated[bool, typer.Option("--list", is_eager=True, callback=list_option("histoscope.train", "train"),
                                        help="List the shipped recipes and exit.")] = False,
) -> None:
    """Cross-validated training of a slide model from a slide CSV and a features folder.

    A rerun into the same folder resumes: finished folds are kept, an interrupted one continues.
    """
    from histoscope.train import load_recipe
    from histoscope.train import train as run_training
    from histoscope.train.loop import format_value
    from histoscope.train.run import results_path

    items = list(overrides or [])
    if recipe is not None and "=" in str(recipe):  # no recipe file, overrides only
        items, recipe = [str(recipe), *items], None
    config = load_recipe(recipe, items)
    if out is not None:
        config.out_dir = str(out)
    if device is not None:
        config.device = device
    # local: folds one after another in this process; ray: parallel tasks (a private head: a CPU per fold)
    with ray_or_none(executor, workers=config.folds, address=address, devices=config.device) as runner:
        results = run_training(config, overwrite=overwrite, log=None if quiet else typer.echo, executor=runner)
    pooled = results["pooled"]
    typer.echo(f"pooled over {len(results['folds'])} folds ({pooled['n']} slides):")
    for name, entry in pooled["metrics"].items():
        value, low, high = (format_value(entry[k], ".4f") for k in ("value", "ci_low", "ci_high"))
        typer.echo(f"  {name:18s} {value}" + (f"  (95% CI {low}–{high})" if low != "n/a" else ""))
    if quiet:
        for warning in results["warnings"]:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"results: {results_path(config.out_dir)}")
    if "final" in results:
        typer.echo(f"final model (all slides, for predict): {results['final']['checkpoint']}")


def predict(
    slides: Annotated[Optional[list[str]], typer.Argument(
        help="Slide files, folders, globs or CSVs for heatmaps and top tiles; none: every features file, "
             "CSV/GeoJSON only.", show_default=False)] = None,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="checkpoint.pt written by histoscope train.")] = ...,
    features: Annotated[Path, typer.Option("--features", "-f", help="Features folder (OUT/features_<encoder>).")] = ...,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    top_k: Annotated[int, typer.Option(min=0, help="Highest-scoring tiles saved as PNG per slide.")] = 8,
    thumbnail: Annotated[int, typer.Option(min=16, help="Longer side of the heatmap in px.")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    precision: Annotated[str, typer.Option(callback=one_of("auto", "fp32", "bf16", "fp16"), help="auto, fp32, bf16 or fp16.")] = "auto",
    slide_mpp: Annotated[Optional[float], typer.Option("--slide-mpp", callback=check_mpp, help="Level-0 µm/px for slides whose metadata lacks it.")] = None,
    detections: Annotated[bool, typer.Option("--detections", help="GeoJSON tiles as QuPath detections instead of tiles.")] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Per-slide predictions, tile-score heatmaps, QuPath GeoJSON and top tiles from a trained model."""
    from histoscope.pipeline import open_executor
    from histoscope.predict import predict_slides, predictions_path

    # local: slides one after another in this process, the model loaded once
    with open_executor(executor, workers=0 if executor == "local" else 1, address=address,
                       gpus_per_task=gpus_per_task(device) if executor == "ray" else 0) as runner:
        result = predict_slides(checkpoint, features_dir=features, out_dir=out, slides=slides or None,
                                slide_mpp=slide_mpp, top_k=top_k, thumbnail_size=thumbnail, device=device,
                                precision=precision, object_type="detection" if detections else "tile",
                                progress=True, executor=runner)
    ok = len(result.records) - len(result.failed)
    typer.echo(f"{ok} slide(s) predicted; {predictions_path(out)}")
    for name in result.failed:
        typer.secho(f"FAILED {name}: {result.records[name].get('error')}", fg=typer.colors.RED, err=True)
    if result.failed:
        raise typer.Exit(BATCH_FAILED)


def register(app: typer.Typer) -> None:
    """Add the ``train`` and ``predict`` commands to ``app``."""
    app.command("train")(train)
    app.command("predict")(predict)
