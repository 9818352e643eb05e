"""``histoscope eval tiles`` and ``histoscope eval slides``: judge encoders as the papers do.

Wired into the main app by ``register(app)``; heavy modules are imported inside the
commands so ``histoscope --help`` stays free of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import fail

__all__ = ["register"]

eval_app = typer.Typer(help="Evaluate tile encoders with UNI's protocols; compare slide-level training runs.",
                       no_args_is_help=True)

# key=value settings of `eval tiles`, beyond its flags
_SETTING_KEYS = ("shots", "episodes", "k", "max_iter", "bootstrap", "seed", "test_fraction", "workers")


def _parse_settings(items: list[str]) -> dict:
    import yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SETTING_KEYS:
            fail(f"unknown setting {item!r}; use key=value with key one of {', '.join(_SETTING_KEYS)}")
        if key == "shots":
            values[key] = tuple(int(s) for s in value.split(",") if s.strip())
        else:
            values[key] = yaml.safe_load(value)
    return values


def _weights_for(encoders: list[str], weights: list[str]) -> list[Optional[str]]:
    if not weights:
        return [None] * len(encoders)
    if len(weights) == 1:
        return weights * len(encoders)
    if len(weights) != len(encoders):
        fail(f"{len(weights)} --weights for {len(encoders)} --encoder; give one for all or one per encoder")
    return list(weights)


def _display_names(encoders: list[str], weights: list[Optional[str]]) -> list[str]:
    if len(set(encoders)) == len(encoders):
        return list(encoders)
    return [f"{e} ({Path(w).stem if w else 'hub'})" for e, w in zip(encoders, weights)]


@eval_app.command("tiles")
def tiles(
    settings: Annotated[Optional[list[str]], typer.Argument(
        help="key=value settings: shots=1,2,4,8 episodes=1000 k=20 max_iter=1000 bootstrap=1000 seed=0 "
             "test_fraction=0.3 workers=4", show_default=False)] = None,
    train: Annotated[Optional[Path], typer.Option(help="Training features h5 (with a 'labels' dataset or --train-labels).")] = None,
    test: Annotated[Optional[Path], typer.Option(help="Test features h5 (with a 'labels' dataset or --test-labels).")] = None,
    train_labels: Annotated[Optional[Path], typer.Option(help="CSV tile,label (or x,y,label) for --train.")] = None,
    test_labels: Annotated[Optional[Path], typer.Option(help="CSV tile,label (or x,y,label) for --test.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Labelled images: ROOT/<class>/*, ROOT/{train,test}/<class>/* or a CSV path,label[,split].")] = None,
    encoder: Annotated[Optional[list[str]], typer.Option("--encoder", "-e", help="Tile encoder for --images (repeat to compare encoders).")] = None,
    weights: Annotated[Optional[list[str]], typer.Option(help="Weights per --encoder (one for all, or one each); 'random' for untrained.")] = None,
    arch: Annotated[Optional[list[str]], typer.Option("--arch", help="Architecture override KEY=VALUE (repeatable), e.g. tiny variants.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("eval_out"),
    protocols: Annotated[str, typer.Option(help="Comma list of linear, knn, simpleshot, fewshot, retrieval.")] = "linear,knn,simpleshot,fewshot,retrieval",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.")] = 64,
) -> None:
    """Linear probe, kNN, SimpleShot, few-shot and ROI retrieval on frozen tile features, with CIs.

    Writes OUT/eval.json, OUT/eval.md (a table per protocol), confusion_<encoder>.png and fewshot.png, and prints the encoders side by side.
    """
    options = _parse_settings(list(settings or []))
    test_fraction = options.pop("test_fraction", 0.3)
    workers = options.pop("workers", 4)
    if (images is None) == (train is None and test is None):
        fail("give either --images (with --encoder) or --train and --test features files")
    from histoscope.eval.tiles import TileEvalSettings, encoder_comparison_markdown, write_tile_report

    try:
        run_settings = TileEvalSettings(protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()),
                                        device=device, **options)
    except (TypeError, ValueError) as error:
        fail(str(error))
    log = lambda message: typer.echo(f"  {message}")  # noqa: E731
    if images is not None:
        docs, extra = _evaluate_images(images, encoder or [], weights or [], arch, run_settings, test_fraction,
                                       workers, batch_size, out, log)
    else:
        docs, extra = _evaluate_features(train, test, train_labels, test_labels, encoder or [], run_settings, log)
    paths = write_tile_report(docs, out, extra=extra)
    typer.echo("")
    typer.echo(encoder_comparison_markdown(docs))
    typer.echo(f"report: {paths.markdown}  ({paths.json})")


def _evaluate_features(train, test, train_labels, test_labels, encoders, settings, log):
    import numpy as np

    from histoscope.eval.labelled import read_labelled_features, sort_classes
    from histoscope.eval.tiles import evaluate_tiles

    if train is None or test is None:
        fail("features mode needs both --train and --test")
    train_x, train_y, attrs = read_labelled_features(train, train_labels)
    test_x, test_y, _ = read_labelled_features(test, test_labels)
    classes = sort_classes([*train_y, *test_y])
    index = {name: i for i, name in enumerate(classes)}
    name = encoders[0] if encoders else str(attrs.get("encoder", Path(train).stem))
    log(f"{name}: {len(train_y)} training and {len(test_y)} test tiles, {len(classes)} classes")
    doc = evaluate_tiles(train_x, np.array([index[y] for y in train_y]), test_x, np.array([index[y] for y in test_y]),
                         settings=settings, class_names=classes, log=log)
    return {name: doc}, {"inputs": {"train": str(train), "test": str(test)}}


def _evaluate_images(images, encoders, weights, arch, settings, test_fraction, workers, batch_size, out, log):
    import numpy as np

    from histoscope.cli.main import _parse_arch
    from histoscope.eval.embed_images import embed_images
    from histoscope.eval.labelled import read_image_set, sort_classes
    from histoscope.eval.tiles import evaluate_tiles

    if not encoders:
        fail("--images needs at least one --encoder")
    image_set = read_image_set(images, test_fraction=test_fraction, seed=settings.seed)
    per_encoder = _weights_for(encoders, weights)
    names = _display_names(encoders, per_encoder)
    log(f"{len(image_set.paths)} images ({image_set.split_source} split: {len(image_set.indices('train'))} train, "
        f"{len(image_set.indices('test'))} test)")
    embedded = {}
    for name, enc, w in zip(names, encoders, per_encoder):
        embedded[name] = embed_images(image_set.paths, encoder=enc, weights=w, arch=_parse_arch(arch),
                                      device=settings.device, batch_size=batch_size, workers=workers,
                                      seed=settings.seed, cache_dir=out / "embeddings", log=log)
    ok = np.logical_and.reduce([ok for _, ok in embedded.values()])
    if not ok.all():
        log(f"left out {int((~ok).sum())} unreadable image(s) for every encoder")
    classes = sort_classes(image_set.labels)
    y = np.array([classes.index(label) for label in image_set.labels])
    split = np.asarray(image_set.split)
    train_rows, test_rows = np.flatnonzero(ok & (split == "train")), np.flatnonzero(ok & (split == "test"))
    docs = {}
    for name, (features, _) in embedded.items():
        log(f"evaluating {name}")
        docs[name] = evaluate_tiles(features[train_rows], y[train_rows], features[test_rows], y[test_rows],
                                    settings=settings, class_names=classes, log=log)
    extra = {"inputs": {"images": str(images), "split": image_set.split_source, "test_fraction": test_fraction,
                        "encoders": [{"name": n, "encoder": e, "weights": w} for n, e, w in
                                     zip(names, encoders, per_encoder)]}}
    return docs, extra


@eval_app.command("slides")
def slides(
    runs: Annotated[list[Path], typer.Argument(help="Output folders of `histoscope train` (two or more).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write comparison.json and comparison.md here.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Compare training runs (e.g. one per encoder) on their common slides, with paired bootstrap p-values."""
    from histoscope.train.compare import compare_runs, run_comparison_markdown

    document = compare_runs(runs, n_bootstrap=bootstrap, seed=seed)
    text = run_comparison_markdown(document)
    typer.echo(text)
    if out is not None:
        from histoscope.io.atomic import atomic_path, json_safe, write_json

        write_json(out / "comparison.json", json_safe(document))
        with atomic_path(out / "comparison.md") as tmp:
            tmp.write_text(text)
        typer.echo(f"wrote {out / 'comparison.md'}")


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command group to ``app``."""
    app.add_typer(eval_app, name="eval")
