"""The HTTP API and the viewer page (FastAPI); :func:`create_app` builds it, :func:`serve` runs it.

Routes (schema at ``/openapi.json``)::

    GET  /                                         the viewer (``/?slide=ID`` opens one)
    GET  /static/{name}                            its script, style sheet and OpenSeadragon
    GET  /api/slides                               every slide: id, size, mpp, reader
    GET  /api/slides/{id}                          one slide: levels, outputs available, predictions
    GET  /api/slides/{id}/tissue                   tissue contours, GeoJSON in level-0 px
    GET  /api/slides/{id}/tiles                    the tile grid (coords, tile size in level-0 px)
    GET  /api/slides/{id}/heatmaps                 score heatmaps: run, score column, image URL, placement
    GET  /api/slides/{id}/heatmaps/{run}/{score}.png   one heatmap (RGBA PNG, ?cmap=)
    GET  /api/slides/{id}/topk                     the k highest-scoring tiles of a run (?run=&score=&k=)
    GET  /api/slides/{id}/region.jpeg              a level-0 square of the slide as JPEG (?x=&y=&size=&out=)
    GET  /api/slides/{id}/thumbnail.jpeg           a small picture of the slide for the list
    GET  /api/slides/{id}/report                   the generated report
    POST /api/slides/{id}/chat                     a question about the slide (501 without a chat model)
    GET  /dzi/{id}.dzi                             Deep Zoom descriptor
    GET  /dzi/{id}_files/{level}/{col}_{row}.{jpeg,jpg,png}   Deep Zoom tiles
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from histoscope.serve import overlays
from histoscope.serve.catalog import Catalog
from histoscope.serve.chat import ChatBackend, ChatUnavailable
from histoscope.serve.deepzoom import FORMATS, dzi_xml
from histoscope.serve.security import Guard
from histoscope.serve.tiles import TileService
from histoscope.tiling.patches_h5 import find_patches
from histoscope.tissue.outputs import tissue_output_paths

__all__ = ["create_app", "serve", "STATIC_FILES"]

# The viewer's files, by the only names /static/ answers to.
STATIC_FILES = {
    "viewer.js": "text/javascript", "viewer.css": "text/css", "openseadragon.min.js": "text/javascript",
    "openseadragon.LICENSE.txt": "text/plain",
}
_TILE_CACHE = "private, max-age=86400"
_DIGITS = r"^[0-9]{1,9}$"
_REGION_READ_MAX = 4096  # px read at a pyramid level for one /region.jpeg
_API_CACHE = "no-cache"


class SlideSummary(BaseModel):
    slide_id: str
    width: int | None = None
    height: int | None = None
    mpp: float | None = Field(None, description="level-0 µm/px from the file's metadata")
    backend: str | None = None
    vendor: str | None = None
    error: str | None = Field(None, description="why the slide cannot be read")


class SlideDetail(SlideSummary):
    levels: list[dict[str, float]] = []
    dzi: str
    outputs: dict[str, bool]
    predictions: dict[str, Any]
    heatmaps: list[str]


class ChatTurn(BaseModel):
    question: str = Field(..., max_length=4000)
    answer: str = Field(..., max_length=20000)


class ChatRequest(BaseModel):
    question: str = Field(..., min_length=1, max_length=4000)
    history: list[ChatTurn] = Field(default_factory=list, max_length=50)


class ChatReply(BaseModel):
    answer: str


def _read_static(name: str) -> bytes:
    return resources.files("histoscope.serve").joinpath("static", name).read_bytes()


def create_app(out_dir: str | Path, slide_roots: list[str | Path], *, token: str | None = None,
               chat: ChatBackend | None = None, cache_bytes: int = 256 << 20, rate: float = 200.0,
               burst: float = 1000.0, max_body: int = 64 << 10, quality: int = 75) -> Guard:
    """The server as an ASGI app: the API and viewer behind :class:`~histoscope.serve.security.Guard`.

    Parameters
    ----------
    out_dir : path
        A run's output folder (``histoscope tile/embed/predict/report`` outputs).
    slide_roots : list of paths
        Folders holding the slides; nothing outside them is opened.
    token : str, optional
        Required on ``/api`` and ``/dzi`` requests when given.
    chat : callable, optional
        ``chat(slide_id, question, history) -> answer`` (see :mod:`histoscope.serve.chat`).
    cache_bytes : int
        Memory bound of the encoded-tile cache.
    rate, burst : float
        Requests per second and burst per client address (``rate=0``: no limit).
    """
    catalog = Catalog(out_dir, slide_roots)
    tiles = TileService(catalog, cache_bytes=cache_bytes, quality=quality)
    index_html = _read_static("index.html")
    static = {name: _read_static(name) for name in STATIC_FILES}
    app = FastAPI(title="histoscope", version="1", docs_url=None, redoc_url=None, redirect_slashes=False,
                  description="Slides, Deep Zoom tiles and a run's outputs (tissue, tile grid, heatmaps, "
                              "top tiles, report, chat).")
    app.state.catalog, app.state.tiles, app.state.chat = catalog, tiles, chat

    def known(slide_id: str) -> None:
        if slide_id not in catalog.slides:
            raise HTTPException(404, f"no slide {slide_id!r}; GET /api/slides lists them")

    def readable(slide_id: str) -> dict[str, Any]:
        known(slide_id)
        info = catalog.info(slide_id)
        if "error" in info:
            raise HTTPException(422, f"slide {slide_id!r} cannot be read: {info['error']}")
        return info

    def cached(request: Request, body: bytes, media_type: str, etag: str) -> Response:
        headers = {"ETag": etag, "Cache-Control": _TILE_CACHE}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    def scores_of(slide_id: str, run: str, score: str) -> overlays.TileScores:
        known(slide_id)
        scores = overlays.tile_scores(catalog, slide_id, run)
        if scores is None:
            raise HTTPException(404, f"no tile scores of slide {slide_id!r} in prediction run {run!r}")
        if score not in scores.scores:
            raise HTTPException(404, f"run {run!r} has no score column {score!r}; it has {sorted(scores.scores)}")
        return scores

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(index_html, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, "no such file")
        return Response(static[name], media_type=STATIC_FILES[name], headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/slides", response_model=list[SlideSummary], summary="Every slide under the slide roots")
    def list_slides(q: str = Query("", max_length=200, description="substring of the slide id")) -> list[dict]:
        catalog.refresh()
        q = q.lower()
        return [catalog.info(slide_id) for slide_id in sorted(catalog.slides) if q in slide_id.lower()]

    @app.get("/api/slides/{slide_id}", response_model=SlideDetail, summary="One slide and its outputs")
    def slide_detail(slide_id: str) -> dict:
        known(slide_id)
        info = catalog.info(slide_id)
        scores = [run for run in overlays.prediction_runs(catalog) if overlays.tile_scores(catalog, slide_id, run)]
        outputs = {
            "tissue": catalog.output(tissue_output_paths(catalog.out_dir, slide_id)["geojson"]) is not None,
            "tiles": catalog.output(find_patches(catalog.out_dir, slide_id)) is not None,
            "report": overlays.slide_report(catalog, slide_id) is not None,
            "chat": chat is not None,
        }
        return {**info, "dzi": f"/dzi/{quote(slide_id, safe='')}.dzi", "outputs": outputs,
                "predictions": overlays.slide_predictions(catalog, slide_id), "heatmaps": scores}

    @app.get("/api/slides/{slide_id}/tissue", summary="Tissue contours (GeoJSON FeatureCollection, level-0 px)")
    def tissue(slide_id: str) -> Response:
        known(slide_id)
        path = catalog.output(tissue_output_paths(catalog.out_dir, slide_id)["geojson"])
        if path is None:
            raise HTTPException(404, f"no tissue contours for {slide_id!r} in OUT/contours_geojson (run histoscope tile)")
        return Response(path.read_bytes(), media_type="application/geo+json", headers={"Cache-Control": _API_CACHE})

    @app.get("/api/slides/{slide_id}/tiles", summary="Tile grid: level-0 top-left corners and tile size")
    def tile_grid(slide_id: str) -> JSONResponse:
        known(slide_id)
        grid = overlays.tile_grid(catalog, slide_id)
        if grid is None:
            raise HTTPException(404, f"no patches file for {slide_id!r} in OUT/patches (run histoscope tile)")
        return JSONResponse(grid, headers={"Cache-Control": _API_CACHE})

    @app.get("/api/slides/{slide_id}/heatmaps", summary="Score heatmaps of every prediction run")
    def heatmaps(slide_id: str) -> list[dict[str, Any]]:
        known(slide_id)
        found = []
        for run in overlays.prediction_runs(catalog):
            scores = overlays.tile_scores(catalog, slide_id, run)
            for column in (scores.scores if scores else ()):
                url = f"/api/slides/{quote(slide_id, safe='')}/heatmaps/{quote(run, safe='')}/{quote(column, safe='')}.png"
                found.append({"run": run, "score": column, "url": url, "tiles": len(scores.coords),
                              "placement": overlays.heatmap_placement(scores)})
        return found

    @app.get("/api/slides/{slide_id}/heatmaps/{run}/{score}.png", summary="One heatmap as an RGBA PNG",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def heatmap(request: Request, slide_id: str, run: str, score: str,
                cmap: Literal[overlays.CMAPS] = "jet") -> Response:  # type: ignore[valid-type]
        scores = scores_of(slide_id, run, score)
        image, placement = overlays.heatmap_image(scores, score, cmap)
        import imagecodecs

        response = cached(request, bytes(imagecodecs.png_encode(image, level=3)), "image/png",
                          tiles.etag(slide_id, "heatmap", run, score, cmap, json.dumps(placement)))
        response.headers["X-Placement"] = json.dumps(placement)
        return response

    @app.get("/api/slides/{slide_id}/topk", summary="The k highest-scoring tiles of a prediction run")
    def topk(slide_id: str, run: str = Query(..., max_length=200), score: str = Query("score", max_length=200),
             k: int = Query(8, ge=1, le=64)) -> list[dict[str, Any]]:
        return overlays.top_tiles(scores_of(slide_id, run, score), score, k)

    @app.get("/api/slides/{slide_id}/region.jpeg", summary="A square of the slide (level-0 px) as JPEG",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def region(request: Request, slide_id: str, x: int = Query(..., ge=0), y: int = Query(..., ge=0),
               size: int = Query(..., ge=1, le=1 << 16), out: int = Query(256, ge=16, le=1024)) -> Response:
        info = readable(slide_id)
        if x >= info["width"] or y >= info["height"]:
            raise HTTPException(422, f"({x}, {y}) is outside the slide ({info['width']} x {info['height']})")
        import cv2

        from histoscope.serve.deepzoom import encode_tile

        with catalog.open(slide_id) as slide:
            level = slide.best_level_for_downsample(size / out)
            read = max(1, round(size / slide.levels[level].downsample))
            if read > _REGION_READ_MAX:  # a pyramid too shallow for this square: refuse, never read gigapixels
                raise HTTPException(422, f"a {size}-px square needs {read} px read from the nearest level; "
                                         f"ask for at most {_REGION_READ_MAX * size // read} px")
            pixels = slide.read_region((x, y), level, (read, read))
        pixels = cv2.resize(pixels, (out, out), interpolation=cv2.INTER_AREA)
        return cached(request, encode_tile(pixels, "jpeg", quality=85), "image/jpeg",
                      tiles.etag(slide_id, "region", x, y, size, out))

    @app.get("/api/slides/{slide_id}/thumbnail.jpeg", summary="A small picture of the slide (at most 256 px)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(request: Request, slide_id: str) -> Response:
        readable(slide_id)
        etag = tiles.etag(slide_id, "thumbnail")
        data = tiles.cache.get(etag)
        if data is None:
            import cv2

            from histoscope.serve.deepzoom import encode_tile

            with catalog.open(slide_id) as slide:
                pixels = slide.thumbnail(256)  # from the coarsest level, in chunks
            scale = 256 / max(pixels.shape[:2])
            if scale < 1:
                pixels = cv2.resize(pixels, (max(1, round(pixels.shape[1] * scale)),
                                             max(1, round(pixels.shape[0] * scale))), interpolation=cv2.INTER_AREA)
            data = encode_tile(pixels, "jpeg", quality=85)
            tiles.cache.put(etag, data)
        return cached(request, data, "image/jpeg", etag)

    @app.get("/api/slides/{slide_id}/report", summary="The report generated for the slide")
    def report(slide_id: str) -> dict[str, str]:
        known(slide_id)
        found = overlays.slide_report(catalog, slide_id)
        if found is None:
            raise HTTPException(404, f"no report for {slide_id!r} in OUT (run histoscope report into OUT or a "
                                     "subfolder of it)")
        return found

    @app.post("/api/slides/{slide_id}/chat", response_model=ChatReply, summary="Ask the chat model about the slide",
              responses={501: {"description": "no chat model configured"}})
    def ask(slide_id: str, request: ChatRequest) -> dict[str, str]:
        known(slide_id)
        if chat is None:
            raise HTTPException(501, "no chat model configured: start histoscope serve with --chat RUN "
                                     "(a histoscope train-chat run folder)")
        try:
            answer = chat(slide_id, request.question, [(t.question, t.answer) for t in request.history])
        except ChatUnavailable as error:
            raise HTTPException(error.status, str(error)) from None
        return {"answer": answer}

    @app.get("/dzi/{slide_id}.dzi", summary="Deep Zoom descriptor (Size = level-0 dimensions)",
             response_class=Response, responses={200: {"content": {"application/xml": {}}}})
    def dzi(request: Request, slide_id: str) -> Response:
        readable(slide_id)
        geometry = tiles.geometry(slide_id)
        return cached(request, dzi_xml(geometry).encode(), "application/xml", tiles.etag(slide_id, "dzi"))

    @app.get("/dzi/{slide_id}_files/{level}/{col}_{row}.{fmt}", summary="One Deep Zoom tile",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
    def dz_tile(request: Request, slide_id: str, level: Annotated[str, PathParam(pattern=_DIGITS)],
                col: Annotated[str, PathParam(pattern=_DIGITS)], row: Annotated[str, PathParam(pattern=_DIGITS)],
                fmt: Literal["jpeg", "jpg", "png"]) -> Response:
        level, col, row = int(level), int(col), int(row)  # plain digits only: one URL per tile
        readable(slide_id)
        etag = tiles.etag(slide_id, level, col, row, fmt)
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": _TILE_CACHE})
        try:
            data = tiles.tile(slide_id, level, col, row, fmt)
        except IndexError as error:
            raise HTTPException(404, f"{slide_id}: {error}") from None
        return cached(request, data, FORMATS[fmt], etag)

    return Guard(app, token=token, max_body=max_body, rate=rate, burst=burst)


def serve(out_dir: str | Path, slide_roots: list[str | Path], *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, chat: ChatBackend | None = None, rate: float = 200.0,
          cache_bytes: int = 256 << 20, log_level: str = "warning") -> None:
    """Run the server until interrupted (uvicorn, one process, tiles read in its thread pool)."""
    import uvicorn

    app = create_app(out_dir, slide_roots, token=token, chat=chat, rate=rate, cache_bytes=cache_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, date_header=True,
                proxy_headers=False, access_log=False, limit_concurrency=256, timeout_keep_alive=5)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

