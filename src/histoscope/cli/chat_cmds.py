"""``histoscope train-chat`` and ``histoscope chat``: train and talk to a PathChat/LLaVA-style assistant.

Wired into the main app by ``register(app)``; torch is imported inside the commands.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import BATCH_FAILED
from histoscope.cli.recipes import list_option, recipe_and_overrides

__all__ = ["register"]


def train_chat(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe name (see --list: chat_tiny, pathchat_llama) or a YAML file.", show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value overrides, dotted for sections: conversations=CONV.json features_dir=DIR out=RUN stage2.lm=lora",
        show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 (recipe's device).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in the output folder instead of resuming it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    list_: Annotated[bool, typer.Option("--list", is_eager=True, callback=list_option("histoscope.train.chat", "train-chat"),
                                        help="List the shipped recipes and exit.")] = False,
) -> None:
    """Train an assistant on LLaVA-format conversations: stage 1 (projector, LM frozen), then stage 2 (with the LM).

    A rerun into the same folder resumes an interrupted run.
    """
    from histoscope.train.chat import load_chat_recipe
    from histoscope.train.chat import train_chat as run_training

    config = load_chat_recipe(*recipe_and_overrides(recipe, overrides))
    if device is not None:
        config.device = device
    result = run_training(config, overwrite=overwrite, log=None if quiet else typer.echo, progress=not quiet)
    last = {r["stage"]: r for r in result["history"]}
    losses = ", ".join(f"stage {s} val_loss {r['val_loss']:.4f}" for s, r in sorted(last.items()) if "val_loss" in r)
    typer.echo(f"model: {result['model']}" + (f" ({losses})" if losses else ""))


def _slide_features(slide: Path, encoder: str, weights: Optional[str], arch: Optional[list[str]], work: Path,
                    device: str) -> Path:
    """Tile and embed one slide (as ``histoscope run`` does) into ``work``; its features file."""
    from histoscope.cli.main import _embed_params
    from histoscope.encoders.registry import get_tile_encoder_spec
    from histoscope.io.features_h5 import features_folder, features_path
    from histoscope.pipeline import TileParams, collect_slides, tile_slides
    from histoscope.pipeline.embed import embed_slides, encoder_tiling

    mpp, size = encoder_tiling(get_tile_encoder_spec(encoder), mpp=None, size=None)
    jobs = collect_slides([str(slide)])
    for stage in (tile_slides(jobs, out_dir=work, params=TileParams(size=size, mpp=mpp), workers=0),
                  embed_slides(jobs, out_dir=work, params=_embed_params(encoder, weights, 64, 0, device, "fp32",
                                                                         False, arch))):
        if stage.failed:
            name = stage.failed[0]
            raise ValueError(f"{slide}: {stage.records[name].get('error')}")
    return features_path(features_folder(work, _embed_params(encoder, weights, 64, 0, device, "fp32", False,
                                                             arch).folder_name), jobs[0].name)


def _interactive(assistant, image, max_new_tokens: int) -> None:
    conversation = assistant.conversation([image])
    typer.echo("Ask about the image; an empty line or Ctrl-D ends the chat.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        typer.echo(f"assistant> {conversation.ask(question, max_new_tokens=max_new_tokens)[0]}")


def chat(
    model: Annotated[Path, typer.Option("--model", "-m", help="A train-chat output folder (or its model.pt).")],
    features: Annotated[Optional[list[str]], typer.Option("--features", "-f", help="Features file (.h5); repeatable, or a folder or CSV of them: one conversation per slide.")] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="Tile image (PNG/JPEG/TIFF), read by the assistant's tile encoder; repeatable.")] = None,
    slide: Annotated[Optional[Path], typer.Option("--slide", help="A slide: tiled and embedded with --encoder first.")] = None,
    encoder: Annotated[Optional[str], typer.Option("--encoder", "-e", help="With --slide: the tile encoder the assistant's features came from.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="With --slide: the encoder's weights (file or folder; 'random' for tests).")] = None,
    arch: Annotated[Optional[list[str]], typer.Option("--arch", help="With --slide: encoder architecture override KEY=VALUE (repeatable).")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", "-q", help="A question; repeat for a multi-turn conversation (each turn sees the earlier ones). None: interactive chat.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Conversations decoded together.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "cpu",
) -> None:
    """Ask a trained assistant about a slide (features file or slide) or a tile image; greedy decoding."""
    from histoscope.language.chat import Assistant, image_tokens_of
    from histoscope.utils.device import resolve_device

    given = [name for name, value in (("--features", features), ("--image", image), ("--slide", slide)) if value]
    if len(given) != 1:
        raise typer.BadParameter(f"give exactly one of --features, --image or --slide (got {', '.join(given) or 'none'})")
    if slide is not None and encoder is None:
        raise typer.BadParameter("--slide needs --encoder, the tile encoder the assistant's features came from")
    assistant = Assistant.load(model, device=resolve_device(device))
    with tempfile.TemporaryDirectory(prefix="histoscope-chat-") as work:
        if features:
            from histoscope.io.features_h5 import collect_features

            inputs = collect_features(features)  # files, folders of them, CSVs
            several = len(features) > 1 or any(Path(f).is_dir() or Path(f).suffix.lower() == ".csv" for f in features)
        elif image:
            inputs, several = [(p.stem, p) for p in image], len(image) > 1
        else:
            inputs, several = [(slide.stem, _slide_features(slide, encoder, weights, arch, Path(work), device))], False
        if not question:
            if len(inputs) != 1:
                raise typer.BadParameter("an interactive chat is about one image; pass --question for several")
            _interactive(assistant, inputs[0][1], max_new_tokens)
            return
        results, failed = {}, {}
        readable = []
        for name, path in inputs:
            try:
                readable.append((name, image_tokens_of(path, encoder=assistant.encoder)))
            except (ValueError, OSError) as error:
                if not several:
                    raise
                failed[name] = str(error)
        for start in range(0, len(readable), batch_size):
            chunk = readable[start : start + batch_size]
            answers = assistant.ask_batch([tokens for _, tokens in chunk], question, max_new_tokens=max_new_tokens)
            results.update({name: a for (name, _), a in zip(chunk, answers)})
    if not several:
        answers = results[inputs[0][0]]
        if as_json:
            typer.echo(json.dumps([{"question": q, "answer": a} for q, a in zip(question, answers)], indent=2))
        else:
            for answer in answers:
                typer.echo(answer)
        return
    if as_json:
        typer.echo(json.dumps([{"slide_id": name, "turns": [{"question": q, "answer": a}
                                                          for q, a in zip(question, results[name])]}
                               for name, _ in inputs if name in results], indent=2))
    else:
        for name, _ in inputs:
            if name in results:
                typer.echo(f"{name}:")
                for q, a in zip(question, results[name]):
                    typer.echo(f"  Q: {q}\n  A: {a}")
    for name, error in failed.items():
        typer.secho(f"FAILED {name}: {error}", fg=typer.colors.RED, err=True)
    if failed:
        raise typer.Exit(BATCH_FAILED)


def register(app: typer.Typer) -> None:
    """Add the ``train-chat`` and ``chat`` commands to ``app``."""
    app.command("train-chat")(train_chat)
    app.command("chat")(chat)
