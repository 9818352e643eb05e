"""histoscope serve: Deep Zoom tiles against the slide and OpenSlide's DeepZoomGenerator, the API over a
run's outputs, and the guard (traversal in every encoding, symlinks, token, limits, opaque errors),
with the path parameters of the OpenAPI schema fuzzed against a live server."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from histoscope.io import open_slide  # noqa: E402
from histoscope.io.atomic import write_json  # noqa: E402
from histoscope.io.sample import make_sample_slide  # noqa: E402
from histoscope.predict.heatmap import colorize, percentile_scores, write_tile_scores  # noqa: E402
from histoscope.serve.app import create_app  # noqa: E402
from histoscope.serve.deepzoom import DeepZoomGeometry, read_dz_tile  # noqa: E402
from histoscope.serve.security import path_problem  # noqa: E402
from histoscope.serve.tiles import ByteLRU  # noqa: E402
from histoscope.tiling.patches_h5 import read_patches  # noqa: E402

SECRET = "HISTOSCOPE-SECRET-7f3a"
TOKEN = "s3cret-token"


def _decode(data: bytes) -> np.ndarray:
    import imagecodecs

    return np.asarray(imagecodecs.imread(data))[..., :3]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """slides/ (one SVS 3000 × 2200 px with levels 1 and 4, a symlink escaping the root, a broken
    slide), OUT from `histoscope tile` plus a prediction run and a report, and secrets beside both."""
    from histoscope.pipeline import tile_slides

    base = tmp_path_factory.mktemp("serve")
    slides, out, outside = base / "slides", base / "out", base / "outside"
    for folder in (slides, out, outside):
        folder.mkdir()
    make_sample_slide(slides / "sample.svs", width=3000, height=2200, mpp=0.25, kind="svs", downsamples=(1, 4),
                      seed=5)
    make_sample_slide(outside / "private.svs", width=600, height=400, mpp=0.25, kind="svs", seed=6)
    (outside / "secret.txt").write_text(SECRET)
    (base / "secret.txt").write_text(SECRET)
    (slides / "escape.svs").symlink_to(outside / "private.svs")
    (slides / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    assert not tile_slides([slides / "sample.svs"], out_dir=out).failed
    # a prediction run beside the tiles: scores rise from left to right
    coords, _ = read_patches(out / "patches" / "sample_patches.h5")
    write_tile_scores(out / "pred_abmil" / "sample" / "tile_scores.csv", coords, coords[:, 0] + 0.001 * coords[:, 1])
    write_json(out / "pred_abmil" / "predictions.json",
               {"model": "abmil", "task": "classification", "slides": [{"slide_id": "sample", "pred_label": "tumour"}]})
    (out / "reports").mkdir()
    with open(out / "reports" / "reports.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "report"], ["sample", "Invasive carcinoma; margins clear."]])
    # outputs that are symlinks leaving OUT: a report file, and a whole prediction run
    os.symlink(outside / "secret.txt", out / "sample.txt")
    evil = outside / "evil_run"
    write_tile_scores(evil / "sample" / "tile_scores.csv", coords, -coords[:, 0])
    write_json(evil / "predictions.json", {"model": SECRET, "slides": [{"slide_id": "sample", "label": SECRET}]})
    os.symlink(evil, out / "pred_evil")
    return {"slides": slides, "out": out, "outside": outside, "base": base}


class Live:
    """An app served by uvicorn on a free loopback port, for requests whose bytes no client may change."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            if body is not None and "Transfer-Encoding" not in (headers or {}):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(site):
    server = Live(create_app(site["out"], [site["slides"]], rate=0))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(site):
    from fastapi.testclient import TestClient

    return TestClient(create_app(site["out"], [site["slides"]], rate=0))


# ---- Deep Zoom ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (2, 1), (255, 1), (254, 254), (255, 300), (3000, 2200), (4097, 3)])
def test_deep_zoom_geometry_is_openslides(size):
    from openslide import ImageSlide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    reference = DeepZoomGenerator(ImageSlide(Image.new("RGB", size)), tile_size=254, overlap=1)
    geometry = DeepZoomGeometry(*size)
    assert geometry.level_count == reference.level_count
    assert geometry.level_dimensions == reference.level_dimensions
    assert geometry.level_dimensions[0] == (1, 1) and geometry.level_dimensions[-1] == size
    for level in range(geometry.level_count):
        assert geometry.level_tiles(level) == reference.level_tiles[level]
        cols, rows = geometry.level_tiles(level)
        for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, 0), (0, rows // 2)}:
            box = geometry.tile_box(level, col, row)
            assert (box.width, box.height) == reference.get_tile_dimensions(level, (col, row))
    with pytest.raises(IndexError):
        geometry.tile_box(geometry.level_count, 0, 0)


def test_dzi_descriptor(client):
    response = client.get("/dzi/sample.dzi")
    assert response.status_code == 200
    assert 'Width="3000" Height="2200"' in response.text and 'TileSize="254"' in response.text
    assert 'Overlap="1"' in response.text and response.headers["etag"]


def test_png_tiles_are_the_slides_pixels(client, site):
    """Levels the pyramid stores (Deep Zoom 12 = level 0, 10 = level 1 at downsample 4) are its pixels exactly,
    overlap included; the .png extension gives them losslessly whatever the descriptor says."""
    geometry = DeepZoomGeometry(3000, 2200)
    with open_slide(site["slides"] / "sample.svs") as slide:
        for level, source in ((12, 0), (10, 1)):
            cols, rows = geometry.level_tiles(level)
            for col, row in [(0, 0), (1, 1), (cols - 1, rows - 1), (cols - 1, 0)]:
                box = geometry.tile_box(level, col, row)
                d = slide.levels[source].downsample
                expected = slide.read_region((round(box.x * d), round(box.y * d)), source, (box.width, box.height))
                response = client.get(f"/dzi/sample_files/{level}/{col}_{row}.png")
                assert response.status_code == 200 and response.headers["content-type"] == "image/png"
                np.testing.assert_array_equal(_decode(response.content), expected)


def test_tiles_match_openslide_deepzoom(client, site):
    """Every tile of every level has DeepZoomGenerator's size; pixels equal it where both read a stored level,
    and differ only by resampling (area vs Lanczos) and JPEG where a level is shrunk."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    reference = DeepZoomGenerator(openslide.OpenSlide(str(site["slides"] / "sample.svs")), 254, 1)
    geometry = DeepZoomGeometry(3000, 2200)
    with open_slide(site["slides"] / "sample.svs") as slide:
        for level in range(geometry.level_count):
            cols, rows = geometry.level_tiles(level)
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                ours = read_dz_tile(slide, geometry, level, col, row)
                assert ours.shape[1::-1] == reference.get_tile_dimensions(level, (col, row))
                theirs = np.asarray(reference.get_tile(level, (col, row)).convert("RGB"))
                if theirs.shape != ours.shape:  # DeepZoomGenerator keeps the aspect ratio of 1-3 px tiles
                    assert level <= 6
                    continue
                diff = np.abs(ours.astype(int) - theirs.astype(int))
                if level in (10, 12):
                    assert diff.max() == 0
                else:
                    assert diff.mean() < 6
                jpeg = _decode(client.get(f"/dzi/sample_files/{level}/{col}_{row}.jpeg").content)
                assert jpeg.shape == ours.shape
                assert np.abs(jpeg.astype(int) - ours.astype(int)).mean() < 12  # q75 on dense texture


def test_concurrent_clients_get_exact_tiles(site):
    """8 clients at once over every tile of levels 10 to 12 (readers pooled, stored tiles shared between
    threads): each PNG equals the tile made alone, by one reader."""
    from concurrent.futures import ThreadPoolExecutor

    server = Live(create_app(site["out"], [site["slides"]], rate=0))
    geometry = DeepZoomGeometry(3000, 2200)
    addresses = [(level, c, r) for level in (10, 11, 12) for c in range(geometry.level_tiles(level)[0])
                 for r in range(geometry.level_tiles(level)[1])]
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda a: server.request("GET", "/dzi/sample_files/{}/{}_{}.png".format(*a)), addresses))
    finally:
        server.close()
    with open_slide(site["slides"] / "sample.svs") as slide:
        for (level, col, row), (status, _, body) in zip(addresses, got):
            assert status == 200
            np.testing.assert_array_equal(_decode(body), read_dz_tile(slide, geometry, level, col, row))


def test_tile_caching_and_errors(client):
    first = client.get("/dzi/sample_files/11/2_2.jpg")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert "max-age" in first.headers["cache-control"]
    again = client.get("/dzi/sample_files/11/2_2.jpg", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert client.get("/dzi/sample_files/11/2_2.png").headers["etag"] != first.headers["etag"]
    tiles = client.app.app.state.tiles
    assert 0 < tiles.cache.used <= tiles.cache.max_bytes and 0 < tiles.stored.used <= tiles.stored.max_bytes
    assert client.get("/dzi/sample_files/13/0_0.jpeg").status_code == 404  # no level 13
    assert client.get("/dzi/sample_files/11/99_0.jpeg").status_code == 404
    assert client.get("/dzi/sample_files/11/0_0.gif").status_code == 422
    for alias in ("1_2/0_0.jpeg", "11/+2_2.jpeg", "11/2_2_2.jpeg", "11/%202_2.jpeg", "11/-1_0.jpeg"):
        assert client.get(f"/dzi/sample_files/{alias}").status_code == 422, alias  # plain digits only
    assert client.get("/dzi/nosuch.dzi").status_code == 404
    broken = client.get("/dzi/broken.dzi")
    assert broken.status_code == 422 and "Traceback" not in broken.text


def test_byte_lru_is_bounded_and_lru():
    cache = ByteLRU(100)
    for i in range(10):
        cache.put(i, bytes(30))
        assert cache.used <= 100
    assert len(cache) == 3 and cache.get(9) is not None and cache.get(6) is None
    cache.get(7)
    cache.put("new", bytes(30))
    assert cache.get(7) is not None and cache.get(8) is None  # 8 was the least recently used
    cache.put("huge", bytes(101))
    assert cache.get("huge") is None


def test_open_slides_are_bounded(tmp_path):
    """Readers of at most ``open_slides`` slides stay open; a dropped slide's readers are closed."""
    from histoscope.serve.catalog import Catalog

    for i in range(3):
        make_sample_slide(tmp_path / f"s{i}.tiff", width=512, height=384, mpp=0.5, kind="tiff", downsamples=(1,), seed=i)
    catalog = Catalog(tmp_path, [tmp_path], handles_per_slide=2, open_slides=2)
    readers = {}
    for slide_id in ["s0", "s1", "s0", "s2"]:
        with catalog.open(slide_id) as slide:
            slide.read_region((0, 0), 0, (8, 8))
            readers[slide_id] = slide
    assert list(catalog._pools) == ["s0", "s2"]  # s1 was the least recently used
    assert readers["s1"]._fd is None and readers["s0"]._fd is not None
    with catalog.open("s0") as first, catalog.open("s0") as second:
        assert first is not second  # two threads never share a reader


def test_new_changed_and_removed_slides(tmp_path):
    """A listing walks the roots again: new slides appear, removed ones go; a rewritten file is reopened and its
    new pixels served (no tile of the old file from any cache)."""
    from fastapi.testclient import TestClient

    make_sample_slide(tmp_path / "a.tiff", width=600, height=400, mpp=0.5, kind="tiff", downsamples=(1,), seed=1)
    client = TestClient(create_app(tmp_path, [tmp_path], rate=0))
    catalog = client.app.app.state.catalog
    old_tile = client.get("/dzi/a_files/10/0_0.png").content
    make_sample_slide(tmp_path / "b.tiff", width=300, height=200, mpp=0.5, kind="tiff", downsamples=(1,), seed=2)
    time.sleep(0.01)
    make_sample_slide(tmp_path / "a.tiff", width=800, height=500, mpp=0.5, kind="tiff", downsamples=(1,), seed=3)
    catalog.refresh(min_interval=0)
    assert [(s["slide_id"], s["width"]) for s in client.get("/api/slides").json()] == [("a", 800), ("b", 300)]
    new_tile = _decode(client.get("/dzi/a_files/10/0_0.png").content)
    with open_slide(tmp_path / "a.tiff") as slide:
        np.testing.assert_array_equal(new_tile, slide.read_region((0, 0), 0, (255, 255)))
    assert not np.array_equal(_decode(old_tile), new_tile)
    (tmp_path / "b.tiff").unlink()
    catalog.refresh(min_interval=0)
    assert [s["slide_id"] for s in client.get("/api/slides").json()] == ["a"]
    assert client.get("/dzi/b.dzi").status_code == 404


def test_plain_image_and_openslide_readers(tmp_path, site):
    """Tiles come through every reader: a PNG (no pyramid, no mpp) is its own pixels; OpenSlide's reader gives
    the fast path's tiles at the levels the pyramid stores."""
    from fastapi.testclient import TestClient
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "roi.png")
    client = TestClient(create_app(tmp_path, [tmp_path], rate=0))
    [info] = client.get("/api/slides").json()
    assert (info["slide_id"], info["width"], info["height"], info["mpp"]) == ("roi", 500, 300, None)
    geometry = DeepZoomGeometry(500, 300)
    top = geometry.level_count - 1
    box = geometry.tile_box(top, 1, 1)
    tile = _decode(client.get(f"/dzi/roi_files/{top}/1_1.png").content)
    np.testing.assert_array_equal(tile, pixels[box.y:box.y + box.height, box.x:box.x + box.width])
    geometry = DeepZoomGeometry(3000, 2200)
    with open_slide(site["slides"] / "sample.svs", backend="openslide") as by_openslide, \
            open_slide(site["slides"] / "sample.svs", backend="tiff") as by_tiff:
        for level, col, row in [(12, 3, 2), (10, 1, 1), (10, 2, 2)]:
            np.testing.assert_array_equal(read_dz_tile(by_openslide, geometry, level, col, row),
                                          read_dz_tile(by_tiff, geometry, level, col, row))


# ---- the API over a run's outputs -----------------------------------------------------------------

def test_slide_list_and_detail(client, site):
    slides = client.get("/api/slides").json()
    ids = [s["slide_id"] for s in slides]
    assert ids == ["broken", "sample"]  # the symlink leaving the root is not listed
    sample = next(s for s in slides if s["slide_id"] == "sample")
    assert (sample["width"], sample["height"], sample["mpp"], sample["backend"]) == (3000, 2200, 0.25, "tiff")
    assert next(s for s in slides if s["slide_id"] == "broken")["error"]
    assert [s["slide_id"] for s in client.get("/api/slides", params={"q": "SAMP"}).json()] == ["sample"]
    detail = client.get("/api/slides/sample").json()
    assert detail["outputs"] == {"tissue": True, "tiles": True, "report": True, "chat": False}
    assert detail["predictions"]["pred_abmil"]["prediction"] == {"pred_label": "tumour"}
    assert detail["heatmaps"] == ["pred_abmil"] and len(detail["levels"]) == 2
    openapi = client.get("/openapi.json").json()
    assert "/dzi/{slide_id}_files/{level}/{col}_{row}.{fmt}" in openapi["paths"]


def test_tissue_and_tile_grid_are_outs_files(client, site):
    tissue = client.get("/api/slides/sample/tissue")
    assert tissue.status_code == 200
    assert tissue.json() == json.loads((site["out"] / "contours_geojson" / "sample.geojson").read_text())
    coords, attrs = read_patches(site["out"] / "patches" / "sample_patches.h5")
    grid = client.get("/api/slides/sample/tiles").json()
    assert grid["coords"] == coords.tolist() and grid["size_level0"] == attrs["patch_size_level0"]
    assert client.get("/api/slides/escape/tissue").status_code == 404  # not a slide of the roots
    assert client.get("/api/slides/broken/tissue").status_code == 404


def test_heatmap_colours_and_top_tiles(client, site):
    coords, attrs = read_patches(site["out"] / "patches" / "sample_patches.h5")
    scores = coords[:, 0] + 0.001 * coords[:, 1]
    [entry] = client.get("/api/slides/sample/heatmaps").json()
    assert (entry["run"], entry["score"]) == ("pred_abmil", "score")
    response = client.get(entry["url"], params={"cmap": "viridis"})
    assert response.status_code == 200
    image = _decode_rgba(response.content)
    placement = json.loads(response.headers["x-placement"])
    assert placement == entry["placement"]
    step = attrs["patch_size_level0"]
    cell = image.shape[1] / (placement["width"] / step)  # image px per tile
    expected = colorize(percentile_scores(scores), "viridis")
    for (x, y), colour in zip(coords, expected):
        px = int((x - placement["x"]) / step * cell + cell / 2)
        py = int((y - placement["y"]) / step * cell + cell / 2)
        assert image[py, px, 3] == 255 and tuple(image[py, px, :3]) == tuple(colour)
    assert (image[..., 3] == 0).any()  # no tile, no colour
    assert client.get(entry["url"], params={"cmap": "not-a-map"}).status_code == 422
    top = client.get("/api/slides/sample/topk", params={"run": "pred_abmil", "k": 5}).json()
    order = np.argsort(-scores, kind="stable")[:5]
    assert [(t["x"], t["y"]) for t in top] == [tuple(coords[i]) for i in order]
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    t = top[0]
    region = client.get("/api/slides/sample/region.jpeg", params={"x": t["x"], "y": t["y"], "size": int(t["size"]),
                                                                  "out": 64})
    assert region.status_code == 200 and _decode(region.content).shape == (64, 64, 3)
    with open_slide(site["slides"] / "sample.svs") as slide:  # the same square, read and shrunk here
        import cv2

        square = slide.read_region((t["x"], t["y"]), 0, (int(t["size"]),) * 2)
        expected = cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(_decode(region.content).astype(int) - expected.astype(int)).mean() < 8  # JPEG q85
    # a square the pyramid has no level coarse enough for (16384 px to read at level 1) is refused, not read
    assert client.get("/api/slides/sample/region.jpeg", params={"x": 0, "y": 0, "size": 65536, "out": 16}).status_code == 422
    assert client.get("/api/slides/sample/topk", params={"run": "nope"}).status_code == 404
    thumb = client.get("/api/slides/sample/thumbnail.jpeg")
    with open_slide(site["slides"] / "sample.svs") as slide:
        expected = slide.thumbnail(256)
    picture = _decode(thumb.content)
    assert picture.shape == (188, 256, 3) and picture.shape[:2] == expected.shape[:2]  # 3000 x 2200 at most 256 px
    assert np.abs(picture.astype(int) - expected.astype(int)).mean() < 8


def _decode_rgba(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def test_report_and_chat_hook(client, site):
    assert client.get("/api/slides/sample/report").json() == {
        "source": "reports/reports.csv", "report": "Invasive carcinoma; margins clear."}
    assert client.get("/api/slides/broken/report").status_code == 404
    refused = client.post("/api/slides/sample/chat", json={"question": "What is it?"})
    assert refused.status_code == 501 and "--chat" in refused.json()["detail"]

    from fastapi.testclient import TestClient

    heard = []

    def chat(slide_id, question, history):
        heard.append((slide_id, question, history))
        return f"{slide_id}: answer {len(history) + 1}"

    with_chat = TestClient(create_app(site["out"], [site["slides"]], chat=chat))
    assert with_chat.get("/api/slides/sample").json()["outputs"]["chat"] is True
    reply = with_chat.post("/api/slides/sample/chat", json={
        "question": "And the margins?", "history": [{"question": "Diagnosis?", "answer": "carcinoma"}]})
    assert reply.json() == {"answer": "sample: answer 2"}
    assert heard == [("sample", "And the margins?", [("Diagnosis?", "carcinoma")])]
    assert with_chat.post("/api/slides/nosuch/chat", json={"question": "x"}).status_code == 404
    assert with_chat.post("/api/slides/sample/chat", json={"question": ""}).status_code == 422


def test_chat_backend_feeds_the_slides_features(site, monkeypatch, tmp_path):
    """--chat RUN: the assistant gets the slide's features file from OUT and the conversation's questions in
    order (greedy decoding replays the earlier answers); without a chat package, a clear error."""
    import sys
    import types

    from histoscope.io.features_h5 import features_folder, features_path, write_features
    from histoscope.serve.chat import ChatUnavailable, load_chat_backend

    out = tmp_path / "out"
    write_features(features_path(features_folder(out, "uni"), "sample"), np.zeros((2, 4), np.float32),
                   np.zeros((2, 2), np.int64))
    calls = []

    class Assistant:  # the language package's interface: Assistant.load(run, device=...).ask(image, questions)
        model = types.SimpleNamespace(image_dim=4)  # the width of the features it reads

        @classmethod
        def load(cls, run, *, device):
            calls.append(("load", str(run), str(device)))
            return cls()

        def ask(self, image, questions):
            calls.append(("ask", Path(image).name, list(questions)))
            return [f"answer {i}" for i in range(len(questions))]

    monkeypatch.setitem(sys.modules, "histoscope.language.chat", types.SimpleNamespace(Assistant=Assistant))
    chat = load_chat_backend(tmp_path / "run", out, device="cpu")
    assert chat("sample", "Margins?", [("Diagnosis?", "carcinoma")]) == "answer 1"
    assert calls == [("load", str(tmp_path / "run"), "cpu"), ("ask", "sample.h5", ["Diagnosis?", "Margins?"])]
    with pytest.raises(ChatUnavailable, match="no features file"):
        chat("other", "Diagnosis?", [])
    monkeypatch.setitem(sys.modules, "histoscope.language.chat", None)  # import fails
    with pytest.raises(RuntimeError, match="no chat models"):
        load_chat_backend(tmp_path / "run", out)


# ---- the guard ----------------------------------------------------------------------------------

TRAVERSALS = [
    "/dzi/..%2f..%2fsecret.txt.dzi", "/dzi/%2e%2e/%2e%2e/secret.txt", "/dzi/%252e%252e%252fsecret.txt.dzi",
    "/api/slides/..%2f..%2foutside%2fsecret.txt", "/api/slides/%2e%2e%2f%2e%2e%2fsecret.txt/tissue",
    "/api/slides/%252e%252e/tissue", "/api/slides/..\\..\\secret.txt", "/api/slides/%5c..%5csecret.txt",
    "/static/../secret.txt", "/static/..%2fsecret.txt", "/static/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/static/viewer.js/../../secret.txt", "/api/slides/%2Fetc%2Fpasswd", "/api/slides//etc/passwd",
    "/dzi/%2Ftmp%2Fsecret.dzi", "/api/slides/sample%00.svs", "/api/slides/..", "/..", "/%2e%2e/secret.txt",
    "/dzi/sample_files/12/../../../secret.txt", "/api/slides/%25252e%25252e%25252fsecret",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_is_refused(live, site, path):
    status, headers, body = live.request("GET", path)
    assert 400 <= status < 500, (path, status)
    assert SECRET.encode() not in body and b"Traceback" not in body


def test_absolute_paths_and_symlinks_are_never_served(live, site):
    secret = str(site["outside"] / "secret.txt")
    for path in (f"/api/slides/{quote(secret, safe='')}", f"/dzi/{quote(secret, safe='')}.dzi",
                 f"/api/slides/{quote(str(site['outside'] / 'private'), safe='')}",
                 "/dzi/escape.dzi", "/dzi/escape_files/9/0_0.png", "/api/slides/escape"):
        status, _, body = live.request("GET", path)
        assert 400 <= status < 500 and SECRET.encode() not in body, path
    for path in ("/api/slides/sample/report", "/api/slides/sample", "/api/slides/sample/heatmaps",
                 "/api/slides/sample/heatmaps/pred_evil/score.png", "/api/slides/sample/topk?run=pred_evil"):
        status, _, body = live.request("GET", path)
        assert SECRET.encode() not in body, path
        assert status == (404 if "pred_evil" in path else 200) and (b"pred_evil" not in body or "pred_evil" in path)
    # the slide behind the escaping symlink is readable, but not through the server
    assert open_slide(site["outside"] / "private.svs").dimensions == (600, 400)


@pytest.mark.parametrize("path", ["/index.html", "/slides/sample", "/api/slides/", "/api", "/dzi/",
                                  "/static/", "/static/app.py", "/docs", "/redoc", "/favicon.ico",
                                  "/api/slides/sample/", "/dzi/sample_files/12/0_0"])
def test_unmatched_paths_are_4xx_without_redirect(live, path):
    status, headers, body = live.request("GET", path)
    assert 400 <= status < 500 and "location" not in {k.lower() for k in headers}, (path, status)


def test_path_problem_decodes_twice():
    assert path_problem("/dzi/sample_files/12/0_0.jpeg") is None
    assert path_problem("/api/slides/my%20slide") is None
    for bad in ("/a/../b", "/a/%2e%2e/b", "/a/%252e%252e/b", "/a%2fb", "/a%252fb", "/a\\b", "/a%00", "//a"):
        assert path_problem(bad), bad


def test_token(site):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(site["out"], [site["slides"]], token=TOKEN, rate=0))
    for path in ("/api/slides", "/api/slides/sample/tissue", "/dzi/sample.dzi", "/dzi/sample_files/0/0_0.png"):
        denied = client.get(path)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, params={"token": TOKEN[:-1]}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get(path, params={"token": TOKEN}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself; it passes ?token= on


def test_serve_refuses_a_public_address_without_token(site):
    from typer.testing import CliRunner

    from histoscope.cli.main import app

    result = CliRunner().invoke(app, ["serve", str(site["out"]), "--slides", str(site["slides"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output
    missing = CliRunner().invoke(app, ["serve", str(site["base"] / "nope"), "--slides", str(site["slides"])])
    assert missing.exit_code == 2 and "no such output folder" in missing.output


def test_body_size_rate_limit_and_opaque_errors(site, monkeypatch):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(site["out"], [site["slides"]], max_body=1024, rate=1, burst=3))
    big = client.post("/api/slides/sample/chat", content=b'{"question": "' + b"x" * 4096 + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413
    statuses = [client.get("/api/slides").status_code for _ in range(8)]
    assert 429 in statuses and statuses[0] == 200
    limited = next(r for r in (client.get("/api/slides") for _ in range(3)) if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1

    from histoscope.serve.tiles import TileService

    def explode(*args, **kwargs):
        raise RuntimeError(f"internal detail {SECRET}")

    monkeypatch.setattr(TileService, "tile", explode)
    failing = TestClient(create_app(site["out"], [site["slides"]], rate=0), raise_server_exceptions=False)
    response = failing.get("/dzi/sample_files/5/0_0.jpeg")
    assert response.status_code == 500
    assert SECRET not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text


def test_streamed_body_over_the_limit_is_refused(site):
    server = Live(create_app(site["out"], [site["slides"]], max_body=1024, rate=0))
    try:
        chunk = b'{"question": "' + b"x" * 4000 + b'"}'
        body = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
        status, _, _ = server.request("POST", "/api/slides/sample/chat", body=body, headers={
            "Transfer-Encoding": "chunked", "Content-Type": "application/json"})
        assert status == 413
    finally:
        server.close()


# ---- fuzzing every path parameter of the schema ---------------------------------------------------

_FRAGMENTS = ["..", "/", ".", "%2e", "%2f", "%252e", "%252f", "%5c", "\\", "%00", "~", "etc", "passwd", "secret.txt",
              "sample", "broken", "escape", "pred_abmil", "score", "_files", ".dzi", ".png", "0", "12", "-1",
              "%20", "ä", "..;", "%c0%ae"]


_REAL = {"slide_id": ["sample", "broken"], "run": ["pred_abmil"], "score": ["score"], "level": ["0", "9", "12"],
         "col": ["0", "1"], "row": ["0", "1"], "fmt": ["jpeg", "png"], "q": ["sam"]}


@st.composite
def _values(draw):
    parts = draw(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(min_size=1, max_size=6)), min_size=1,
                          max_size=6))
    return "".join(parts)


def _fill(template: str, values: dict[str, str], quoting: int) -> str:
    path = template
    for name, value in values.items():
        if quoting == 0:  # as drawn (what a hand-written URL would hold), but only URL-legal bytes
            encoded = quote(value, safe="/%.\\~;")
        else:
            encoded = value
            for _ in range(quoting):
                encoded = quote(encoded, safe="")
        path = path.replace("{" + name + "}", encoded)
    return path


def _fuzz_route(live, template: str, names: list[str], queries: list[str]) -> None:
    """Drawn values of ``template``'s path parameters (raw or percent-encoded once or twice) and of its
    string query parameters; real values are among the draws, so the handlers behind the routes run too."""

    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        values = {name: data.draw(st.one_of(st.sampled_from(_REAL.get(name, ["x"])), _values()), label=name)
                  for name in names}
        path = _fill(template, values, data.draw(st.integers(0, 2), label="encodings"))
        params = {name: data.draw(st.one_of(st.sampled_from(_REAL.get(name, ["x"])), _values()), label=name)
                  for name in queries}
        if params:
            path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        method = "POST" if template.endswith("/chat") else "GET"
        body = b'{"question": "x"}' if method == "POST" else None
        status, _, content = live.request(method, path, body=body,
                                          headers={"Content-Type": "application/json"} if body else None)
        assert status < 500 or (status == 501 and method == "POST"), (path, status)  # 501: no chat model
        assert not 300 <= status < 400, (path, status)
        assert SECRET.encode() not in content, path

    check()


def test_fuzz_every_path_parameter(live, client):
    """Every path parameter of every route in the OpenAPI schema, and their string query parameters:
    no 5xx, no redirect, no secret."""
    schema = client.get("/openapi.json").json()
    routes = {}
    for path, item in schema["paths"].items():
        parameters = [p for op in item.values() for p in op.get("parameters", [])]
        names = sorted({p["name"] for p in parameters if p["in"] == "path"})
        queries = sorted({p["name"] for p in parameters if p["in"] == "query" and p["schema"].get("type") == "string"})
        if names:
            routes[path] = (names, queries)
    assert len(routes) >= 10 and routes["/api/slides/{slide_id}/topk"][1] == ["run", "score"]
    for template, (names, queries) in routes.items():
        _fuzz_route(live, template, names, queries)


# ---- the viewer in a real browser ---------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tissue_fraction(rgb: np.ndarray) -> float:
    """H&E: red and blue well above green."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return float(((r > g + 25) & (b > g + 25)).mean())


def _jet_fraction(rgb: np.ndarray) -> float:
    """Colours of jet's middle and top (green, yellow, orange, red) over tissue or glass: blue well below
    green or red."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return float(((g > b + 40) | (r > b + 80)).mean())


def test_viewer_in_headless_chromium(site, tmp_path, histoscope_cli):
    """The viewer at /?slide=ID&token=…: tiles drawn, zoomed, heatmap toggled on; the screenshots show
    H&E tissue, then jet colours running from blue on the left to red on the right (scores rise with x)."""
    import shutil
    import subprocess
    import urllib.error
    import urllib.request

    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    server = subprocess.Popen(histoscope_cli("serve", str(site["out"]), "--slides", str(site["slides"]), "--port",
                                             str(port)), env={**os.environ, "HISTOSCOPE_SERVE_TOKEN": TOKEN},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the token came from the environment
            urllib.request.urlopen(base + "/api/slides", timeout=10)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=shutil.which("chromium") or CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 700})
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{base}/?slide=sample&token={TOKEN}")

                def settled(action=None):
                    page.evaluate("document.body.dataset.settled = '0'")
                    if action:
                        action()
                    page.wait_for_selector("body[data-settled='1']", timeout=45_000)

                settled()
                viewer = page.locator("#viewer")

                def shot(name):
                    from PIL import Image

                    path = tmp_path / name
                    viewer.screenshot(path=str(path))
                    return np.asarray(Image.open(path).convert("RGB"))

                whole = shot("whole.png")
                assert _tissue_fraction(whole) > 0.1
                settled(lambda: page.evaluate("hsViewer.viewport.zoomBy(2); hsViewer.viewport.applyConstraints()"))
                zoomed = shot("zoomed.png")
                assert _tissue_fraction(zoomed) > 0.1
                assert page.evaluate("hsViewer.viewport.getZoom()") > 1.5
                r, g, b = (zoomed[..., i].astype(int) for i in range(3))
                contour = (g > 120) & (r < 60) & (b < 60)  # the tissue contours, drawn in green
                assert contour.mean() > 0.0005
                page.uncheck("#show-tissue")  # redrawn at once: the colours below are the images' alone
                plain = shot("plain.png")
                r, g, b = (plain[..., i].astype(int) for i in range(3))
                assert ((g > 120) & (r < 60) & (b < 60)).mean() < contour.mean() / 10
                assert _jet_fraction(plain) < 0.01
                settled(lambda: page.check("#show-heatmap"))
                heat = shot("heatmap.png")
                assert _jet_fraction(heat) > 0.2
                r, b = heat[..., 0].astype(int), heat[..., 2].astype(int)
                half = heat.shape[1] // 2
                assert (r - b)[:, half:].mean() > (r - b)[:, :half].mean() + 30  # red right, blue left
                settled(lambda: page.uncheck("#show-heatmap"))
                assert _jet_fraction(shot("off.png")) < 0.01
                assert page.locator("#report").inner_text() == "Invasive carcinoma; margins clear."
                assert page.locator("#gallery img").count() == 8
                page.wait_for_function("[...document.querySelectorAll('#gallery img')]"
                                       ".every(img => img.complete && img.naturalWidth === 128)", timeout=30_000)
                assert page.locator("#chat-input").is_disabled()  # no --chat: the panel says how to get one
                assert not errors, errors
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(10)
