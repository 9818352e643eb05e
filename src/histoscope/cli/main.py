"""``histoscope`` command line: a thin layer over the Python API, one command per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from histoscope.cli.errors import BATCH_FAILED, HandledGroup, check_mpp, one_of
from histoscope.cli.executor_opts import AddressOpt, ExecutorOpt, ray_or_none
from histoscope.io.mpp import mpp_problem
from histoscope.io.open import BACKENDS
from histoscope.tiling.geometry import DEFAULT_MPP, DEFAULT_SIZE
from histoscope.tiling.grid import DEFAULT_MIN_TISSUE

app = typer.Typer(
    cls=HandledGroup,  # one-line errors and exit codes for every command (cli/errors.py)
    help="histoscope: gigapixel slides → tissue → tiles at exact microns → embeddings → predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SlidesArg = Annotated[list[str], typer.Argument(help="Slide files, folders, glob patterns or CSV files (path[, slide_id, mpp]).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=0, help="Worker processes (0: run in this process).")]
SlideMppOpt = Annotated[Optional[float], typer.Option("--slide-mpp", callback=check_mpp, help="Level-0 µm/px for slides whose metadata lacks it (a CSV `mpp` column wins).")]
BackendOpt = Annotated[str, typer.Option(callback=one_of(*BACKENDS), help="Slide reader: auto, tiff, openslide or image.")]


@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="Slide file.")],
    slide_mpp: SlideMppOpt = None,
    backend: BackendOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Dimensions, levels, mpp, vendor, backend and associated images of a slide."""
    from histoscope.io import open_slide

    with open_slide(slide, slide_mpp=slide_mpp, backend=backend) as s:
        data = s.info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"{data['path']}")
    typer.echo(f"  backend     {data['backend']} ({data['vendor']})")
    w, h = data["dimensions"]
    typer.echo(f"  dimensions  {w} x {h} px")
    mpp = data["mpp"]
    if mpp is None:
        typer.echo("  mpp         unknown (pass --slide-mpp)")
    else:
        typer.echo(f"  mpp         {mpp:.4f} µm/px" + (" (implausible: pass --slide-mpp)" if mpp_problem(mpp) else ""))
    for i, level in enumerate(data["levels"]):
        typer.echo(f"  level {i}     {level['width']} x {level['height']}  downsample {level['downsample']}")
    typer.echo(f"  associated  {', '.join(data['associated_images']) or '-'}")


@app.command("sample-slide")
def sample_slide(
    out: Annotated[Path, typer.Argument(help="Output slide file (.svs, .tiff or .ome.tiff).")],
    width: Annotated[int, typer.Option(help="Level-0 width in px.")] = 8192,
    height: Annotated[int, typer.Option(help="Level-0 height in px.")] = 6144,
    mpp: Annotated[float, typer.Option(callback=check_mpp, help="Level-0 µm/px written to the metadata.")] = 0.25,
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
    mpp: Annotated[float, typer.Option(callback=check_mpp, help="Target resolution of the tiles in µm/px.")] = DEFAULT_MPP,
    size: Annotated[int, typer.Option(min=1, help="Tile edge in px at the target resolution.")] = DEFAULT_SIZE,
    overlap: Annotated[int, typer.Option(min=0, help="Overlap between neighbouring tiles in px.")] = 0,
    min_tissue: Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum tissue fraction of a kept tile.")] = DEFAULT_MIN_TISSUE,
    slide_mpp: SlideMppOpt = None,
    workers: WorkersOpt = 1,
    backend: BackendOpt = "auto",
    keep_pen: Annotated[bool, typer.Option("--keep-pen", help="Do not remove pen marks from the tissue mask.")] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Segment tissue and write tile coordinates at exact microns for many slides."""
    from histoscope.pipeline import TileParams, open_executor, tile_slides

    params = TileParams(size=size, mpp=mpp, overlap=overlap, min_tissue=min_tissue, remove_pen=not keep_pen,
                        backend=backend)
    with open_executor(executor, workers=workers, address=address) as runner:
        result = tile_slides(slides, out_dir=out, params=params, slide_mpp=slide_mpp, executor=runner)
    _summarise(result, out)


def _summarise(result, out: Path, *, exit_on_failure: bool = True) -> None:
    from histoscope.pipeline.batch import report_path

    done = [r for r in result.records.values() if r["status"] == "ok"]
    tiles = sum(r.get("tiles", 0) or 0 for r in done)
    skipped = sum(bool(r.get("skipped")) for r in done)
    typer.echo(f"{len(done)} slide(s) ok ({skipped} already done), {tiles} tiles; report: {report_path(out)}")
    for name in result.failed:
        typer.secho(f"FAILED {name}: {result.records[name].get('error')}", fg=typer.colors.RED, err=True)
    if result.failed and exit_on_failure:
        raise typer.Exit(BATCH_FAILED)


def _parse_arch(items: list[str] | None) -> dict:
    import yaml

    arch = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expects KEY=VALUE, got {item!r}", param_hint="'--arch'")
        try:
            arch[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise typer.BadParameter(f"the value of {item!r} is not a number, word or YAML list; quote it",
                                     param_hint="'--arch'") from None
    return arch


EncoderOpt = Annotated[str, typer.Option("--encoder", "-e", help="Tile encoder (see `histoscope models`).")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Checkpoint file or folder as published; default: the Hugging Face Hub; 'random' (seed 0) or 'random:SEED' for untrained weights.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Tiles per batch.")]
DevicesOpt = Annotated[str, typer.Option("--devices", help="auto, cpu, cuda, or a comma list such as cuda:0,cuda:1.")]
DtypeOpt = Annotated[str, typer.Option(callback=one_of("auto", "fp32", "bf16", "fp16"), help="auto (bf16 where the hardware has it), fp32, bf16 or fp16.")]
ArchOpt = Annotated[Optional[list[str]], typer.Option("--arch", help="Architecture override KEY=VALUE (repeatable), e.g. for tiny test variants.")]


def _embed_params(encoder, weights, batch_size, workers, devices, dtype, compile_, arch):
    from histoscope.pipeline.embed import EmbedParams

    return EmbedParams(encoder=encoder, weights=weights, batch_size=batch_size, workers=workers,
                       devices=tuple(d.strip() for d in devices.split(",") if d.strip()), dtype=dtype,
                       compile=compile_, arch=_parse_arch(arch))


@app.command()
def embed(
    slides: SlidesArg,
    out: OutOpt,
    encoder: EncoderOpt = "uni",
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 64,
    workers: Annotated[int, typer.Option("--workers", "-w", min=0, help="Tile-decoding worker processes.")] = 2,
    devices: DevicesOpt = "auto",
    dtype: DtypeOpt = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    slide_mpp: SlideMppOpt = None,
    arch: ArchOpt = None,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Embed the tiles listed by `histoscope tile` into OUT/features_<encoder>/<slide>.h5."""
    from histoscope.io.features_h5 import features_folder
    from histoscope.pipeline.embed import embed_slides

    params = _embed_params(encoder, weights, batch_size, workers, devices, dtype, compile_, arch)
    with ray_or_none(executor, workers=workers, address=address, devices=devices) as runner:
        result = embed_slides(slides, out_dir=out, params=params, slide_mpp=slide_mpp, executor=runner)
    _summarise(result, features_folder(out, params.folder_name))


@app.command()
def run(
    slides: SlidesArg,
    out: OutOpt,
    encoder: EncoderOpt = "uni",
    weights: WeightsOpt = None,
    mpp: Annotated[Optional[float], typer.Option(callback=check_mpp, help=f"Tile resolution in µm/px (default: the encoder's native one, else {DEFAULT_MPP}).")] = None,
    size: Annotated[Optional[int], typer.Option(min=1, help=f"Tile edge in px (default: the encoder's native tile, else {DEFAULT_SIZE}).")] = None,
    slide_mpp: SlideMppOpt = None,
    workers: WorkersOpt = 2,
    batch_size: BatchOpt = 64,
    devices: DevicesOpt = "auto",
    dtype: DtypeOpt = "auto",
    arch: ArchOpt = None,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Tile and embed in one go (tissue → tiles → features)."""
    from histoscope.encoders.registry import get_tile_encoder_spec
    from histoscope.io.features_h5 import features_folder
    from histoscope.pipeline import TileParams, collect_slides, tile_slides
    from histoscope.pipeline.embed import embed_slides, encoder_tiling

    spec = get_tile_encoder_spec(encoder)
    mpp, size = encoder_tiling(spec, mpp=mpp, size=size)
    jobs = collect_slides(slides, slide_mpp=slide_mpp)  # keeps CSV slide ids and mpp
    params = _embed_params(encoder, weights, batch_size, workers, devices, dtype, False, arch)
    with ray_or_none(executor, workers=workers, address=address, devices=devices) as runner:
        tiled = tile_slides(jobs, out_dir=out, params=TileParams(size=size, mpp=mpp), workers=workers,
                            executor=runner)
        _summarise(tiled, out, exit_on_failure=False)
        ok = [job for job in jobs if tiled.records[job.name]["status"] == "ok"]
        if ok:
            embedded = embed_slides(ok, out_dir=out, params=params, executor=runner)
            _summarise(embedded, features_folder(out, params.folder_name), exit_on_failure=False)
    if tiled.failed or (ok and embedded.failed):
        raise typer.Exit(BATCH_FAILED)


@app.command()
def models(
    kind: Annotated[str, typer.Option(callback=one_of("tile", "slide", "align", "report", "all"),
                                      help="tile, slide, align, report or all.")] = "all",
) -> None:
    """List registered models with their embedding size, preprocessing and weight source."""
    if kind in ("tile", "all"):
        from histoscope.encoders import get_tile_encoder_spec, list_tile_encoders

        typer.echo("Tile encoders (histoscope embed --encoder NAME; also timm:<name>, hf-hub:<org>/<repo>)")
        typer.echo(f"  {'name':16} {'dim':>5}  {'input':18} {'mpp':>5}  {'weights':34} license")
        for name in list_tile_encoders():
            spec = get_tile_encoder_spec(name)
            p = spec.preprocess
            size = f"{p.resize}" + (f"→{p.crop}" if p.crop else "") + f" {p.interpolation}"
            source = (spec.hf_repo or "file only (--weights)") + (" (gated)" if spec.gated else "")
            mpp = f"{spec.native_mpp:g}" if spec.native_mpp else "-"
            typer.echo(f"  {name:16} {spec.embed_dim:>5}  {size:18} {mpp:>5}  {source:34} {spec.license}")
    if kind in ("slide", "all"):
        from histoscope.slide import get_slide_model_spec, list_slide_models

        typer.echo("Slide models (histoscope train model=NAME)")
        for name in list_slide_models():
            typer.echo(f"  {name:16} {get_slide_model_spec(name).description}")
    if kind in ("align", "all"):
        from histoscope.language.align import get_align_model_spec, list_align_models

        typer.echo("Image–text models (histoscope train-align model=NAME)")
        for name in list_align_models():
            typer.echo(f"  {name:16} {get_align_model_spec(name).description}")
    if kind in ("report", "all"):
        from histoscope.language import get_report_model_spec, list_report_models

        typer.echo("Report models (histoscope train-report model=NAME; histoscope report --model WEIGHTS)")
        for name in list_report_models():
            spec = get_report_model_spec(name)
            source = f"{spec.hf_repo}/{spec.hf_filename}" if spec.hf_repo else "-"  # "-": a local file only
            typer.echo(f"  {name:16} {source:46} {spec.license:10} {spec.description}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    workers: WorkersOpt = 1,
) -> None:
    """Run the main job end to end on a generated sample slide (tiles, then embeddings).

    Tissue → tiles at 0.5 µm/px → embeddings by a small ViT with explicitly random
    weights, since no pretrained weights can ship with the package.
    """
    from histoscope.io.features_h5 import features_folder
    from histoscope.io.sample import make_sample_slide
    from histoscope.pipeline import tile_slides
    from histoscope.pipeline.embed import EmbedParams, embed_slides

    slide_path = out / "slides" / "sample.svs"
    if not slide_path.exists():
        make_sample_slide(slide_path, width=8192, height=6144, mpp=0.25, kind="svs")
        typer.echo(f"generated {slide_path}")
    tiled = tile_slides([slide_path], out_dir=out, workers=workers)
    _summarise(tiled, out)
    typer.secho("embedding with timm:vit_small_patch16_224 and RANDOM weights (demo only; for real features "
                "use e.g. `histoscope embed ... --encoder uni --weights PATH`)", fg=typer.colors.YELLOW)
    params = EmbedParams(encoder="timm:vit_small_patch16_224", weights="random", workers=workers, batch_size=32,
                         output_name="demo_vit_small_random")
    embedded = embed_slides([slide_path], out_dir=out, params=params)
    _summarise(embedded, features_folder(out, params.folder_name))


def _register_stage_commands() -> None:
    from histoscope.cli import align_cmds, chat_cmds, eval_cmds, pretrain_cmds, report_cmds, slide_cmds

    slide_cmds.register(app)
    eval_cmds.register(app)
    align_cmds.register(app)
    chat_cmds.register(app)
    pretrain_cmds.register(app)
    report_cmds.register(app)

    from histoscope.cli import serve_cmds

    serve_cmds.register(app)


_register_stage_commands()

if __name__ == "__main__":
    app()
