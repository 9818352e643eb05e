"""``predict``: per-slide predictions, heatmaps, tile CSV/GeoJSON and top tiles from a trained model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from histoscope import open_slide
from histoscope.cli.slide_cmds import register
from histoscope.io.features_h5 import write_features
from histoscope.io.sample import make_sample_slide
from histoscope.predict import paint_heatmap, percentile_scores, predict_slides, tiles_geojson
from histoscope.train import TrainConfig, train
from histoscope.train.synthetic import COORDS_ATTRS, make_mil_cohort

KEY = [1, 6, 10]  # key tiles of the positive slide on its 4 x 3 grid


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint trained on a synthetic MIL cohort, plus slides whose features share its signal."""
    root = tmp_path_factory.mktemp("predict")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cohort = make_mil_cohort(root / "cohort", slides=40, seed=0)
        train(TrainConfig(csv=str(cohort.csv), features_dir=str(cohort.features_dir), out_dir=str(root / "run"),
                          tiny=True, folds=2, epochs=20, lr=5e-3, device="cpu", precision="fp32", bootstrap=10))
    finally:
        torch.set_num_threads(previous)
    features_dir = root / "features_synthetic"
    slides_dir = root / "slides"
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * 512  # (12, 2) level-0 x, y
    for seed, name in enumerate(["positive", "negative"]):
        make_sample_slide(slides_dir / f"{name}.svs", width=2048, height=1536, mpp=0.25, seed=seed)
        features = rng.normal(size=(12, 32)).astype(np.float32)
        if name == "positive":
            features[KEY] += 5 * cohort.direction.astype(np.float32)
        write_features(features_dir / f"{name}.h5", features, grid, coords_attrs=COORDS_ATTRS)
    (slides_dir / "corrupt.svs").write_bytes((slides_dir / "positive.svs").read_bytes()[:5000])
    write_features(features_dir / "corrupt.h5", rng.normal(size=(12, 32)), grid, coords_attrs=COORDS_ATTRS)
    make_sample_slide(slides_dir / "no_features.svs", width=1024, height=1024, mpp=0.25, seed=3)
    return {"root": root, "checkpoint": root / "run" / "fold_0" / "checkpoint.pt", "features": features_dir,
            "slides": slides_dir, "grid": grid}


def test_predict_writes_heatmap_tiles_geojson_and_top_tiles(setup, tmp_path):
    slides = setup["slides"]
    result = predict_slides(setup["checkpoint"], features_dir=setup["features"], out_dir=tmp_path,
                            slides=[slides / "positive.svs", slides / "negative.svs"], top_k=3, thumbnail_size=512,
                            device="cpu")
    assert result.ok
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    assert rows["positive"]["pred_label"] == "positive" and float(rows["positive"]["prob_positive"]) > 0.5
    assert rows["negative"]["pred_label"] == "negative"
    assert json.loads((tmp_path / "predictions.json").read_text())["slides"][0]["slide_id"] == "positive"

    out = tmp_path / "positive"
    tiles = list(csv.DictReader(open(out / "tile_scores.csv")))
    assert [[int(t["x"]), int(t["y"])] for t in tiles] == setup["grid"].tolist()
    scores = np.array([float(t["score"]) for t in tiles])
    assert scores.sum() == pytest.approx(1.0, abs=1e-2)  # attention weights (bf16 on AMX CPUs)
    assert set(np.argsort(-scores)[:3].tolist()) == set(KEY)

    with open_slide(setup["slides"] / "positive.svs") as slide:
        thumbnail = slide.thumbnail(512)
        top_coords = setup["grid"][np.argsort(-scores)[:3]]
        expected_tiles = slide.read_tiles(top_coords, size=256, mpp=0.5)
    heatmap = np.asarray(Image.open(out / "heatmap.png"))
    assert heatmap.shape == thumbnail.shape == (384, 512, 3)
    assert np.abs(heatmap.astype(int) - thumbnail).mean() > 10  # the whole slide is covered by tiles

    top = sorted((out / "top_tiles").glob("*.png"))
    assert [p.name.split("_")[0] for p in top] == ["01", "02", "03"]
    x, y = top_coords[0]
    assert top[0].name == f"01_x{x}_y{y}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(top[0])), expected_tiles[0])

    collection = json.loads((out / "tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 12
    for feature, (x, y), score in zip(collection["features"], setup["grid"], scores):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + 512, y], [x + 512, y + 512], [x, y + 512], [x, y]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["attention"] == pytest.approx(score)
        color = props["classification"]["color"]
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        assert props["classification"]["name"].startswith("attention ")


def test_bad_slides_are_reported_and_the_rest_finish(setup, tmp_path):
    slides = setup["slides"]
    result = predict_slides(setup["checkpoint"], features_dir=setup["features"], out_dir=tmp_path,
                            slides=[slides / "positive.svs", slides / "corrupt.svs", slides / "no_features.svs"],
                            top_k=2, thumbnail_size=256, device="cpu")
    assert sorted(result.failed) == ["corrupt", "no_features"]
    assert "corrupt.svs" in result.records["corrupt"]["error"]
    assert "no features file" in result.records["no_features"]["error"]
    assert (tmp_path / "positive" / "heatmap.png").is_file()
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert {r["slide"]: r["status"] for r in report["slides"]} == {
        "positive": "ok", "corrupt": "failed", "no_features": "failed"}
    assert list(json.loads((tmp_path / "predictions.json").read_text())["failed"]) == ["corrupt", "no_features"]


def test_cli_predict_exit_codes(setup, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    slides = setup["slides"]
    args = ["predict", "-c", str(setup["checkpoint"]), "-f", str(setup["features"]), "--top-k", "1",
            "--thumbnail", "256", "--device", "cpu"]
    ok = runner.invoke(app, [*args, str(slides / "positive.svs"), str(slides / "negative.svs"),
                             "-o", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ok" / "negative" / "top_tiles").is_dir()
    bad = runner.invoke(app, [*args, str(slides / "positive.svs"), str(slides / "corrupt.svs"),
                              "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "FAILED corrupt" in bad.output
    missing = runner.invoke(app, ["predict", "-c", str(tmp_path / "nope.pt"), "-f", str(setup["features"]),
                                  "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no such checkpoint" in missing.output


def test_features_only_predicts_every_features_file(setup, tmp_path):
    result = predict_slides(setup["checkpoint"], features_dir=setup["features"], out_dir=tmp_path, device="cpu",
                            object_type="detection")
    assert sorted(result.records) == ["corrupt", "negative", "positive"] and result.ok
    assert not (tmp_path / "positive" / "heatmap.png").exists()
    feature = json.loads((tmp_path / "positive" / "tiles.geojson").read_text())["features"][0]
    assert feature["properties"]["objectType"] == "detection"


def test_heatmap_painting_and_percentiles():
    assert percentile_scores(np.array([0.1, 0.5, 0.5, 0.9])).tolist() == pytest.approx([0, 0.5, 0.5, 1])
    assert percentile_scores(np.array([3.0])).tolist() == [1.0]
    thumbnail = np.full((10, 20, 3), 200, np.uint8)  # a 2000 x 1000 slide at 1/100
    painted = paint_heatmap(thumbnail, np.array([[0, 0], [1000, 500]]), 500, (2000, 1000), np.array([0.0, 1.0]),
                            alpha=1.0)
    from matplotlib import colormaps

    low = (np.array(colormaps["jet"](0.0)[:3]) * 255).round()
    high = (np.array(colormaps["jet"](1.0)[:3]) * 255).round()
    assert np.array_equal(painted[0:5, 0:5].reshape(-1, 3), np.tile(low, (25, 1)))
    assert np.array_equal(painted[5:10, 10:15].reshape(-1, 3), np.tile(high, (25, 1)))
    assert (painted[0:5, 5:20] == 200).all() and (painted[5:10, 0:10] == 200).all()
    collection = tiles_geojson(np.array([[0, 0], [512, 0]]), 512, np.array([0.2, 0.8]))
    names = [f["properties"]["classification"]["name"] for f in collection["features"]]
    assert names == ["attention 0-10%", "attention 90-100%"]
