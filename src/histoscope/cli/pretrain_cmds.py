"""``histoscope pretrain OBJECTIVE RECIPE.yaml [key=value ...]``: self-supervised pretraining.

The same command runs as one process or under ``torchrun`` (one or many nodes). Wired
into the main app by ``register(app)``; torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.recipes import list_option

__all__ = ["register"]


def pretrain(
    objective: Annotated[str, typer.Argument(help="Pretraining method: dinov2, mae (tile encoders), slide_mae "
                                                  "(LongNet slide encoder), hipt256, hipt4k (HIPT's two levels).")],
    recipe: Annotated[Optional[str], typer.Argument(
        help="Recipe name (see --list), e.g. dinov2_vits16, mae_tiny, slide_mae_gigapath, or a YAML file.",
        show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value overrides, dotted for sections: optim.batch_size=256 data.patches=[OUT] crops.local_crops_number=6",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (recipe's out_dir).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda (recipe's device; under torchrun each process takes cuda:LOCAL_RANK).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh instead of resuming the run in the output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-step lines or progress bar.")] = False,
    list_: Annotated[bool, typer.Option("--list", is_eager=True,
                                        callback=list_option("histoscope.pretrain", "pretrain OBJECTIVE"),
                                        help="List the shipped recipes and exit.")] = False,
) -> None:
    """Pretrain a tile encoder (any ViT of `histoscope models`) on tiles streamed from slides, or a
    slide model (slide_mae, hipt4k) on tile embeddings streamed from features files.

    A rerun into the same folder resumes from its last checkpoint, mid-epoch. The result is
    exported in the model's published layout (tile encoders: for `histoscope embed --weights`).
    """
    from histoscope.pretrain import load_pretrain_recipe
    from histoscope.pretrain import pretrain as run_pretraining

    items = list(overrides or [])
    if recipe is not None and "=" in str(recipe):  # no recipe file, overrides only
        items, recipe = [str(recipe), *items], None
    loaded = load_pretrain_recipe(objective, recipe, items)
    if out is not None:
        loaded.common.out_dir = str(out)
    if device is not None:
        loaded.common.device = device
    result = run_pretraining(loaded, overwrite=overwrite, progress=not quiet, log=None if quiet else typer.echo)
    if result["export"] is not None:
        typer.echo(f"exported {result['export']} (how to load it: {result['export'].with_suffix('.json')})")


def register(app: typer.Typer) -> None:
    """Add the ``pretrain`` command to ``app``."""
    app.command("pretrain")(pretrain)
