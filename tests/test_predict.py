"""``predict``: per-slide predictions, heatmaps, tile CSV/GeoJSON and top tiles from a trained model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from typer.testing import CliRunner

from histoscope import open_slide
from histoscope.cli.main import app
from histoscope.io.features_h5 import read_features, write_features
from histoscope.io.sample import make_sample_slide
from histoscope.predict import paint_heatmap, percentile_scores, predict_slides, tiles_geojson
from histoscope.predict.heatmap import colorbar_geometry
from histoscope.slide.trained import load_trained_model
from histoscope.train import TrainConfig, train
from histoscope.train.synthetic import GEOMETRY, make_mil_cohort

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
        write_features(features_dir / f"{name}.h5", features, grid, coords_attrs=GEOMETRY.attrs())
    (slides_dir / "corrupt.svs").write_bytes((slides_dir / "positive.svs").read_bytes()[:5000])
    write_features(features_dir / "corrupt.h5", rng.normal(size=(12, 32)), grid, coords_attrs=GEOMETRY.attrs())
    make_sample_slide(slides_dir / "no_features.svs", width=1024, height=1024, mpp=0.25, seed=3)
    return {"root": root, "checkpoint": root / "run" / "fold_0" / "checkpoint.pt", "features": features_dir,
            "slides": slides_dir, "grid": grid}


def _by_hand(checkpoint, features_path):
    """The checkpoint's model applied to one features file: (class probabilities (C,), tile scores (N,))."""
    trained = load_trained_model(checkpoint)
    features, coords, _ = read_features(features_path)
    with torch.no_grad():
        output = trained.model(torch.from_numpy(features)[None], torch.from_numpy(coords).float()[None])
    logits = output.logits[0].double().numpy()
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return dict(zip(trained.outputs.class_names, probs)), output.scores[0].double().numpy()


def test_predict_writes_heatmap_tiles_geojson_and_top_tiles(setup, tmp_path):
    slides = setup["slides"]
    result = predict_slides(setup["checkpoint"], features_dir=setup["features"], out_dir=tmp_path,
                            slides=[slides / "positive.svs", slides / "negative.svs"], top_k=3, thumbnail_size=512,
                            device="cpu", precision="fp32")
    assert result.ok
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    listed = {r["slide_id"]: r for r in json.loads((tmp_path / "predictions.json").read_text())["slides"]}
    assert list(listed) == ["positive", "negative"]
    for name in ("positive", "negative"):
        probs, _ = _by_hand(setup["checkpoint"], setup["features"] / f"{name}.h5")
        assert rows[name]["pred_label"] == listed[name]["pred_label"] == max(probs, key=probs.get)
        for label, prob in probs.items():
            assert float(rows[name][f"prob_{label}"]) == pytest.approx(prob, rel=1e-5, abs=1e-7)
            assert listed[name][f"prob_{label}"] == pytest.approx(prob, rel=1e-5, abs=1e-7)
    assert rows["positive"]["pred_label"] == "positive" and rows["negative"]["pred_label"] == "negative"

    out = tmp_path / "positive"
    _, expected_scores = _by_hand(setup["checkpoint"], setup["features"] / "positive.h5")
    ranks = np.argsort(np.argsort(expected_scores)) / (len(expected_scores) - 1)  # distinct scores: rank / (N - 1)
    tiles = list(csv.DictReader(open(out / "tile_scores.csv")))
    assert [[int(t["x"]), int(t["y"])] for t in tiles] == setup["grid"].tolist()
    scores = np.array([float(t["score"]) for t in tiles])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose([float(t["percentile"]) for t in tiles], ranks)
    assert set(np.argsort(-scores)[:3].tolist()) == set(KEY)

    # The 512 x 384 thumbnail of the 2048 x 1536 slide shows each 512-px tile as a 128-px block,
    # half the slide's pixel and half the jet colour of the tile's percentile.
    with open_slide(setup["slides"] / "positive.svs") as slide:
        thumbnail = slide.thumbnail(512)
        top_coords = setup["grid"][np.argsort(-scores)[:3]]
        expected_tiles = slide.read_tiles(top_coords, size=256, mpp=0.5)
    heatmap = np.asarray(Image.open(out / "heatmap.png"))
    assert thumbnail.shape == (384, 512, 3)
    assert heatmap.shape == (384, 512 + colorbar_geometry(384, "tile score percentile")[-1], 3)  # the colour bar's panel on the right
    for (x, y), rank in zip(setup["grid"] // 4, ranks):
        colour = (np.array(colormaps["jet"](rank)[:3]) * 255).round()
        expected = (0.5 * thumbnail[y : y + 128, x : x + 128] + 0.5 * colour).round()
        np.testing.assert_array_equal(heatmap[y : y + 128, x : x + 128], expected)

    top = sorted((out / "top_tiles").glob("*.png"))
    assert [p.name.split("_")[0] for p in top] == ["01", "02", "03"]
    for path, (x, y), expected_tile in zip(top, top_coords, expected_tiles):
        assert path.name.endswith(f"_x{x}_y{y}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected_tile)

    collection = json.loads((out / "tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 12
    for feature, (x, y), score, rank in zip(collection["features"], setup["grid"], expected_scores, ranks):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + 512, y], [x + 512, y + 512], [x, y + 512], [x, y]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["attention"] == pytest.approx(score, rel=1e-5)
        assert props["measurements"]["attention_percentile"] == pytest.approx(rank)
        decile = min(int(rank * 10), 9)  # QuPath class: the score's decile, drawn in its middle colour
        assert props["classification"]["name"] == f"attention {10 * decile}-{10 * decile + 10}%"
        assert props["classification"]["color"] == (np.array(colormaps["jet"]((decile + 0.5) / 10)[:3]) * 255).round().tolist()


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
                            precision="fp32", object_type="detection")
    assert sorted(result.records) == ["corrupt", "negative", "positive"] and result.ok
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    for name in rows:
        probs, scores = _by_hand(setup["checkpoint"], setup["features"] / f"{name}.h5")
        assert float(rows[name]["prob_positive"]) == pytest.approx(probs["positive"], rel=1e-5, abs=1e-7)
        tile_scores = [float(t["score"]) for t in csv.DictReader(open(tmp_path / name / "tile_scores.csv"))]
        np.testing.assert_allclose(tile_scores, scores, rtol=1e-5, atol=1e-8)
    assert not (tmp_path / "positive" / "heatmap.png").exists()
    feature = json.loads((tmp_path / "positive" / "tiles.geojson").read_text())["features"][0]
    assert feature["properties"]["objectType"] == "detection"


def test_heatmap_painting_and_percentiles():
    assert percentile_scores(np.array([0.1, 0.5, 0.5, 0.9])).tolist() == pytest.approx([0, 0.5, 0.5, 1])
    assert percentile_scores(np.array([3.0])).tolist() == [1.0]
    thumbnail = np.full((10, 20, 3), 200, np.uint8)  # a 2000 x 1000 slide at 1/100
    painted = paint_heatmap(thumbnail, np.array([[0, 0], [1000, 500]]), 500, (2000, 1000), np.array([0.0, 1.0]),
                            alpha=1.0)
    low = (np.array(colormaps["jet"](0.0)[:3]) * 255).round()
    high = (np.array(colormaps["jet"](1.0)[:3]) * 255).round()
    assert np.array_equal(painted[0:5, 0:5].reshape(-1, 3), np.tile(low, (25, 1)))
    assert np.array_equal(painted[5:10, 10:15].reshape(-1, 3), np.tile(high, (25, 1)))
    assert (painted[0:5, 5:20] == 200).all() and (painted[5:10, 0:10] == 200).all()
    collection = tiles_geojson(np.array([[0, 0], [512, 0]]), 512, np.array([0.2, 0.8]))
    names = [f["properties"]["classification"]["name"] for f in collection["features"]]
    assert names == ["attention 0-10%", "attention 90-100%"]
