"""`histoscope eval tiles` on a labelled tile set cut from the sample slides (real encoder
architectures, explicit random weights), the image-set inputs and embedding cache, labelled
features files, and `histoscope eval slides` comparing training runs."""

from __future__ import annotations

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histoscope import load_tile_encoder
from histoscope.cli.main import app
from histoscope.eval.embed_images import embed_images
from histoscope.eval.labelled import read_image_set, read_labelled_features, stratified_split
from histoscope.io.features_h5 import write_features
from histoscope.io.sample import make_sample_tiles
from histoscope.train import TrainConfig, compare_runs, train
from histoscope.io.columns import read_columns, write_columns
from histoscope.train.synthetic import make_mil_cohort

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--arch", f"{k}={v}")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """ROOT/{glass,he,ihc}/*.png: 10 tiles each, 96 px, cut from H&E and IHC sample slides."""
    root = tmp_path_factory.mktemp("tiles")
    counts = make_sample_tiles(root, per_class=10, size=96, seed=0)
    assert counts == {"he": 10, "glass": 10, "ihc": 10}
    return root


def test_sample_tiles_are_visually_distinct(tiles):
    means = {label: np.mean([np.asarray(Image.open(p)).mean((0, 1)) for p in sorted((tiles / label).glob("*.png"))],
                            axis=0) for label in ("glass", "he", "ihc")}
    assert means["glass"].min() > 200  # near-white glass
    assert means["he"][0] > means["he"][1] and means["he"][2] > means["he"][1]  # pink/purple eosin and haematoxylin
    assert np.abs(means["he"] - means["ihc"]).max() > 10  # DAB brown vs H&E


def test_image_set_split_sources(tiles, tmp_path):
    seeded = read_image_set(tiles, test_fraction=0.3, seed=0)
    assert seeded.split_source == "seeded" and len(seeded.paths) == 30
    labels, split = np.asarray(seeded.labels), np.asarray(seeded.split)
    for label in ("glass", "he", "ihc"):
        assert (split[labels == label] == "test").sum() == 3  # round(10 · 0.3) per class
    assert read_image_set(tiles, test_fraction=0.3, seed=0) == seeded
    assert read_image_set(tiles, test_fraction=0.3, seed=1).split != seeded.split
    # train/test folders
    for path, label, part in zip(seeded.paths, seeded.labels, seeded.split):
        (tmp_path / "folders" / part / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "folders" / part / label / path.name)
    folders = read_image_set(tmp_path / "folders")
    assert folders.split_source == "folders"
    assert sorted(zip([p.name for p in folders.paths], folders.split)) == sorted(
        zip([p.name for p in seeded.paths], seeded.split))
    # CSV with relative paths and a split column; then without one
    table = tmp_path / "images.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([os.path.relpath(p, tmp_path), l, s] for p, l, s in zip(seeded.paths, seeded.labels,
                                                                                  seeded.split))
    from_csv = read_image_set(table)
    assert from_csv.split == seeded.split and [p.resolve() for p in from_csv.paths] == list(seeded.paths)
    with pytest.raises(ValueError, match="split values must be train or test"):
        table.write_text("path,label,split\na.png,x,validation\n")
        read_image_set(table)
    with pytest.raises(ValueError, match="needs at least 2 per class"):
        stratified_split(["a", "a", "b"], test_fraction=0.5, seed=0)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_image_set(tmp_path / "nowhere")


def test_embed_images_matches_the_encoder_and_caches(tiles, tmp_path):
    paths = sorted(tiles.rglob("*.png"))[:7]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    torch.manual_seed(0)
    weights = tmp_path / "uni_tiny.pt"  # UNI's timm layout
    arch = {**TINY, "init_values": 1.0}
    torch.save(load_tile_encoder("uni", weights="random", **arch).model.state_dict(), weights)
    features, ok = embed_images([*paths, broken], encoder="uni", weights=weights, arch=arch, device="cpu",
                                dtype="fp32", batch_size=3, cache_dir=tmp_path / "cache")
    assert ok.tolist() == [True] * 7 + [False] and (features[7] == 0).all()
    encoder = load_tile_encoder("uni", weights=weights, **arch)
    with torch.inference_mode():
        for path, row in zip(paths, features):
            expected = encoder(encoder.transform(np.array(Image.open(path).convert("RGB"))))[0]
            np.testing.assert_allclose(row, expected.numpy(), rtol=1e-5, atol=1e-5)
    cached = list((tmp_path / "cache").glob("uni-*.h5"))
    assert len(cached) == 1

    def no_loading(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    import histoscope

    original = histoscope.load_tile_encoder
    histoscope.load_tile_encoder = no_loading
    try:
        again, ok_again = embed_images([*paths, broken], encoder="uni", weights=weights, arch=arch, device="cpu",
                                       dtype="fp32", cache_dir=tmp_path / "cache")
    finally:
        histoscope.load_tile_encoder = original
    np.testing.assert_array_equal(again, features)
    np.testing.assert_array_equal(ok_again, ok)
    os.utime(paths[0], ns=(1, 1))  # a changed file is a new key
    embed_images(paths, encoder="uni", weights=weights, arch=arch, device="cpu", dtype="fp32",
                 cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("uni-*.h5"))) == 2
    # random weights are drawn from the seed: the same seed, the same embeddings
    a, _ = embed_images(paths[:2], encoder="phikon", weights="random", arch=TINY, device="cpu", dtype="fp32", seed=3)
    b, _ = embed_images(paths[:2], encoder="phikon", weights="random", arch=TINY, device="cpu", dtype="fp32", seed=3)
    c, _ = embed_images(paths[:2], encoder="phikon", weights="random", arch=TINY, device="cpu", dtype="fp32", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.integration
def test_cli_eval_tiles_images_two_encoders(tiles, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "tiles", "--images", str(tiles), "-e", "phikon", "-e", "uni", "--weights", "random",
            *TINY_ARGS, "--arch", "init_values=1.0", "--device", "cpu", "--out", str(out), "--batch-size", "8"]
    result = CliRunner().invoke(app, [*args, "episodes=50", "bootstrap=100", "shots=1,2,4,16", "max_iter=200"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert list(report["encoders"]) == ["phikon", "uni"]
    assert report["inputs"]["split"] == "seeded"
    for name, doc in report["encoders"].items():
        assert doc["classes"] == ["glass", "he", "ihc"] and (doc["n_train"], doc["n_test"]) == (21, 9)
        assert set(doc["protocols"]) == {"linear", "knn", "simpleshot", "fewshot", "retrieval"}
        assert list(doc["protocols"]["fewshot"]["shots"]) == ["1", "2", "4"]
        assert doc["protocols"]["fewshot"]["skipped_shots"] == [16]
        linear = doc["protocols"]["linear"]["metrics"]
        assert linear["bacc"]["ci_low"] <= linear["bacc"]["value"] <= linear["bacc"]["ci_high"]
        # three visually distinct textures: even random weights separate them
        assert doc["protocols"]["simpleshot"]["metrics"]["bacc"]["value"] > 0.6
        assert (out / f"confusion_{name}.png").stat().st_size > 1000
    assert (out / "fewshot.png").stat().st_size > 1000
    markdown = (out / "eval.md").read_text()
    for heading in ("## Linear probe", "## kNN (k=20)", "## SimpleShot", "## Few-shot", "## ROI retrieval",
                    "## Comparison"):
        assert heading in markdown
    assert "| phikon |" in result.output and "| uni |" in result.output  # the side-by-side table
    caches = sorted((out / "embeddings").glob("*.h5"))
    assert len(caches) == 2
    with h5py.File(caches[0]) as a, h5py.File(caches[1]) as b:  # same shape, separate random draws
        assert a["features"].shape == b["features"].shape and not np.allclose(a["features"][:], b["features"][:])

    # A rerun with a subset of the protocols reuses the cached embeddings and agrees.
    rerun = CliRunner().invoke(app, [*args, "--protocols", "knn", "bootstrap=100"])
    assert rerun.exit_code == 0, rerun.output
    assert "from the cache" in rerun.output
    again = json.loads((out / "eval.json").read_text())
    assert set(again["encoders"]["uni"]["protocols"]) == {"knn"}
    assert again["encoders"]["uni"]["protocols"]["knn"] == report["encoders"]["uni"]["protocols"]["knn"]


def test_cli_eval_tiles_features_files(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 2
    def write(path, n, with_labels):
        y = np.arange(n) % 3
        x = centres[y] + rng.normal(size=(n, 16))
        coords = np.stack([np.arange(n) * 256, np.zeros(n, int)], 1)
        write_features(path, x, coords, features_attrs={"encoder": "toy"})
        if with_labels:
            with h5py.File(path, "a") as f:
                f.create_dataset("labels", data=np.array(["a", "b", "c"])[y].astype("S"))
        return x, y, coords
    write(tmp_path / "train.h5", 45, True)
    _, test_y, coords = write(tmp_path / "test.h5", 30, False)
    with open(tmp_path / "test.csv", "w", newline="") as fh:  # labels by coordinates, two tiles left out
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "label"])
        writer.writerows([c[0], c[1], "abc"[t]] for c, t in list(zip(coords, test_y))[2:])
    x, labels, attrs = read_labelled_features(tmp_path / "test.h5", tmp_path / "test.csv")
    assert len(x) == 28 and list(labels[:3]) == ["c", "a", "b"] and attrs["encoder"] == "toy"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "tiles", "--train", str(tmp_path / "train.h5"), "--test",
                                      str(tmp_path / "test.h5"), "--test-labels", str(tmp_path / "test.csv"),
                                      "--protocols", "linear,knn,retrieval", "--out", str(out), "--device", "cpu",
                                      "bootstrap=50", "max_iter=100"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "eval.json").read_text())["encoders"]["toy"]
    assert doc["n_test"] == 28 and doc["protocols"]["linear"]["metrics"]["acc"]["value"] > 0.9
    missing = CliRunner().invoke(app, ["eval", "tiles", "--train", str(tmp_path / "test.h5"), "--test",
                                       str(tmp_path / "test.h5"), "--out", str(out)])
    assert missing.exit_code == 2 and "no 'labels' dataset" in missing.output
    both = CliRunner().invoke(app, ["eval", "tiles", "--out", str(out)])
    assert both.exit_code == 2 and "either --images" in both.output
    bad = CliRunner().invoke(app, ["eval", "tiles", "--train", str(tmp_path / "train.h5"), "--test",
                                   str(tmp_path / "test.h5"), "--test-labels", str(tmp_path / "test.csv"), "epoch=3"])
    assert bad.exit_code == 2 and "unknown setting 'epoch=3'" in bad.output


# --- eval slides --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A real tiny training run, and a copy whose predictions are degraded on purpose."""
    root = tmp_path_factory.mktemp("runs")
    cohort = make_mil_cohort(root / "cohort", slides=24, dim=16, seed=0)
    config = TrainConfig(csv=str(cohort.csv), features_dir=str(cohort.features_dir), out_dir=str(root / "abmil"),
                         model="abmil_gated", tiny=True, folds=3, epochs=8, lr=5e-3, batch_size=1, patience=8,
                         device="cpu", precision="fp32", bootstrap=200, seed=0)
    results = train(config)
    worse = root / "abmil_noisy"
    shutil.copytree(root / "abmil", worse)
    rng = np.random.default_rng(0)
    for fold in results["folds"]:
        path = worse / f"fold_{fold['fold']}" / "predictions.csv"
        columns = read_columns(path)
        flip = rng.uniform(size=len(columns["slide_id"])) < 0.5  # swap the probabilities of half the slides
        negative, positive = columns["prob_negative"], columns["prob_positive"]
        columns["prob_negative"] = [float(p if f else n) for n, p, f in zip(negative, positive, flip)]
        columns["prob_positive"] = [float(n if f else p) for n, p, f in zip(negative, positive, flip)]
        write_columns(path, columns)
    return root / "abmil", worse, results


def test_compare_runs_paired_over_the_same_slides(two_runs):
    good, worse, results = two_runs
    document = compare_runs([good, worse], n_bootstrap=200, seed=0)
    assert document["n_slides"] == 24 and document["task"] == "classification"
    # On all of its slides with the same resamples, a run's numbers are its own pooled results.
    assert document["runs"]["abmil"]["metrics"] == results["pooled"]["metrics"]
    pair = document["pairs"][0]
    assert (pair["a"], pair["b"]) == ("abmil", "abmil_noisy")
    assert pair["metrics"]["auroc"]["diff"] == pytest.approx(
        results["pooled"]["metrics"]["auroc"]["value"] - document["runs"]["abmil_noisy"]["metrics"]["auroc"]["value"])
    assert pair["metrics"]["auroc"]["diff"] > 0 and pair["metrics"]["auroc"]["p_value"] < 0.05
    itself = compare_runs([good, good], n_bootstrap=50)  # a run against itself
    assert list(itself["runs"]) == ["abmil", "abmil (2)"]
    assert all(m["diff"] == 0 and m["p_value"] == 1.0 for m in itself["pairs"][0]["metrics"].values())


def test_cli_eval_slides_and_its_errors(two_runs, tmp_path):
    good, worse, _ = two_runs
    result = CliRunner().invoke(app, ["eval", "slides", str(good), str(worse), "--bootstrap", "100", "--out",
                                      str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "| abmil − abmil_noisy |" in result.output and "p = " in result.output
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["n_slides"] == 24 and (tmp_path / "cmp" / "comparison.md").read_text() in result.output
    # a run trained on other labels is refused, naming the slide
    relabelled = tmp_path / "relabelled"
    shutil.copytree(worse, relabelled)
    path = next(relabelled.glob("fold_*")) / "predictions.csv"
    columns = read_columns(path)
    columns["target"][0] = str(1 - int(columns["target"][0]))
    write_columns(path, columns)
    refused = CliRunner().invoke(app, ["eval", "slides", str(good), str(relabelled), "--bootstrap", "10"])
    assert refused.exit_code == 2 and f"slide '{columns['slide_id'][0]}'" in refused.output
    lonely = CliRunner().invoke(app, ["eval", "slides", str(good)])
    assert lonely.exit_code == 2 and "at least two" in lonely.output
    not_a_run = CliRunner().invoke(app, ["eval", "slides", str(good), str(tmp_path)])
    assert not_a_run.exit_code == 2 and "no results.json" in not_a_run.output
