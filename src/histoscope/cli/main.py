"""``histoscope`` command line: a thin layer over the Python API, one command per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="histoscope: gigapixel slides → tissue → tiles at exact microns → embeddings → predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SlidesArg = Annotated[list[str], typer.Argument(help="Slide files, folders, glob patterns or CSV files (path[, slide_id, mpp]).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", help="Worker processes (0: run in this process).")]
SlideMppOpt = Annotated[Optional[float], typer.Option("--slide-mpp", help="Level-0 µm/px for slides whose metadata lacks it (a CSV `mpp` column wins).")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="Slide file.")],
    slide_mpp: SlideMppOpt = None,
    backend: Annotated[str, typer.Option(help="auto, tiff, openslide or image.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Dimensions, levels, mpp, vendor, backend and associated images of a slide."""
    from histoscope.io import SlideError, open_slide

    try:
        with open_slide(slide, mpp=slide_mpp, backend=backend) as s:
            data = s.info()
    except (SlideError, FileNotFoundError) as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"{data['path']}")
    typer.echo(f"  backend     {data['backend']} ({data['vendor']})")
    w, h = data["dimensions"]
    typer.echo(f"  dimensions  {w} x {h} px")
    mpp = data["mpp"]
    typer.echo(f"  mpp         {mpp:.4f} µm/px" if mpp else "  mpp         unknown (pass --slide-mpp)")
    for i, level in enumerate(data["levels"]):
        typer.echo(f"  level {i}     {level['width']} x {level['height']}  downsample {level['downsample']}")
    typer.echo(f"  associated  {', '.join(data['associated_images']) or '-'}")


@app.command("sample-slide")
def sample_slide(
    out: Annotated[Path, typer.Argument(help="Output slide file (.svs, .tiff or .ome.tiff).")],
    width: Annotated[int, typer.Option(help="Level-0 width in px.")] = 8192,
    height: Annotated[int, typer.Option(help="Level-0 height in px.")] = 6144,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px written to the metadata.")] = 0.25,
    kind: Annotated[Optional[str], typer.Option(help="svs, tiff or ome (default: from the suffix).")] = None,
    stain: Annotated[str, typer.Option(help="Texture source: he or ihc.")] = "he",
    pen_marks: Annotated[bool, typer.Option(help="Draw a marker stroke on the glass.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for the tissue layout.")] = 0,
) -> None:
    """Write a realistic pyramidal JPEG-tiled slide built from real H&E (or IHC) pixels."""
    from histoscope.io.sample import make_sample_slide

    if kind is None:
        name = out.name.lower()
        kind = "ome" if name.endswith((".ome.tif", ".ome.tiff")) else ("svs" if name.endswith(".svs") else "tiff")
    sample = make_sample_slide(out, width=width, height=height, mpp=mpp, kind=kind, stain=stain,
                               pen_marks=pen_marks, seed=seed)
    typer.echo(f"wrote {sample.path} ({width} x {height} px at {mpp} µm/px, levels {list(sample.downsamples)})")


@app.command()
def tile(
    slides: SlidesArg,
    out: OutOpt,
    mpp: Annotated[float, typer.Option(help="Target resolution of the tiles in µm/px.")] = 0.5,
    size: Annotated[int, typer.Option(help="Tile edge in px at the target resolution.")] = 256,
    overlap: Annotated[int, typer.Option(help="Overlap between neighbouring tiles in px.")] = 0,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a kept tile.")] = 0.1,
    slide_mpp: SlideMppOpt = None,
    workers: WorkersOpt = 1,
    backend: Annotated[str, typer.Option(help="Slide reader: auto, tiff, openslide or image.")] = "auto",
    keep_pen: Annotated[bool, typer.Option("--keep-pen", help="Do not remove pen marks from the tissue mask.")] = False,
) -> None:
    """Segment tissue and write tile coordinates at exact microns for many slides."""
    from histoscope.pipeline import TileParams, tile_slides

    params = TileParams(size=size, mpp=mpp, overlap=overlap, min_tissue=min_tissue, remove_pen=not keep_pen,
                        backend=backend)
    try:
        result = tile_slides(slides, out_dir=out, params=params, workers=workers, slide_mpp=slide_mpp)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    _summarise(result, out)


def _summarise(result, out: Path) -> None:
    done = [r for r in result.records.values() if r["status"] == "ok"]
    tiles = sum(r.get("tiles", 0) or 0 for r in done)
    skipped = sum(bool(r.get("skipped")) for r in done)
    typer.echo(f"{len(done)} slide(s) ok ({skipped} already done), {tiles} tiles; report: {out / 'run_report.json'}")
    for name in result.failed:
        typer.secho(f"FAILED {name}: {result.records[name].get('error')}", fg=typer.colors.RED, err=True)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    workers: WorkersOpt = 1,
) -> None:
    """Run the main job end to end on a sample slide the project generates itself."""
    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import tile_slides

    slide_path = out / "slides" / "sample.svs"
    if not slide_path.exists():
        make_sample_slide(slide_path, width=8192, height=6144, mpp=0.25, kind="svs")
        typer.echo(f"generated {slide_path}")
    result = tile_slides([slide_path], out_dir=out, workers=workers)
    _summarise(result, out)


if __name__ == "__main__":
    app()
