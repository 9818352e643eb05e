"""`histoscope embed`: features files, parity with one-by-one encoding, resume, errors."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from histoscope import open_slide
from histoscope.cli.main import app
from histoscope.encoders import load_tile_encoder
from histoscope.pipeline.embed import EmbedParams, embed_slides
from histoscope.io.features_h5 import read_features
from histoscope.io.sample import make_sample_slide
from histoscope.pipeline import LocalExecutor, tile_slides
from histoscope.tiling import read_patches

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Two small slides tiled at 0.5 µm/px, and a tiny UNI-architecture checkpoint."""
    root = tmp_path_factory.mktemp("embed")
    for i, (w, h) in enumerate([(2048, 1536), (1536, 1536)]):
        make_sample_slide(root / "slides" / f"s{i}.svs", width=w, height=h, mpp=0.25, seed=40 + i)
    result = tile_slides([root / "slides"], out_dir=root / "out", executor=LocalExecutor(workers=0), progress=False)
    assert result.ok
    torch.manual_seed(0)
    reference = timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                                  num_classes=0, dynamic_img_size=True, **TINY)
    torch.save(reference.state_dict(), root / "uni_tiny.bin")
    return root


def _params(root, **kw):
    base = dict(encoder="uni", weights=str(root / "uni_tiny.bin"), arch=TINY, workers=2, batch_size=8, dtype="fp32",
                devices=("cpu",))
    base.update(kw)
    return EmbedParams(**base)


def test_features_match_encoding_tiles_one_by_one(tiled):
    out = tiled / "out"
    result = embed_slides([tiled / "slides"], out_dir=out, params=_params(tiled), progress=False)
    assert result.ok, result.records
    encoder = load_tile_encoder("uni", weights=tiled / "uni_tiny.bin", **TINY)
    for name in ("s0", "s1"):
        features, coords, attrs = read_features(out / "features_uni" / f"{name}.h5")
        patches, _ = read_patches(out / "patches" / f"{name}_patches.h5")
        assert len(patches) > 0 and features.shape == (len(patches), 48)
        np.testing.assert_array_equal(coords, patches)
        assert attrs["encoder"] == "uni" and attrs["dtype"] == "float32" and attrs["patch_size_level0"] == 512
        assert attrs["weights_sha256"] == encoder.weights_sha256 and len(attrs["weights_sha256"]) == 64
        slide = open_slide(tiled / "slides" / f"{name}.svs")
        for row in (0, len(patches) // 2, len(patches) - 1):
            tile = slide.read_tiles(patches[row : row + 1], size=256, mpp=0.5)
            with torch.inference_mode():
                expected = encoder(encoder.transform(tile)).numpy()[0]
            np.testing.assert_allclose(features[row], expected, rtol=1e-4, atol=1e-4)
        assert result.records[name]["tiles"] == len(patches)
    report = json.loads((out / "features_uni" / "run_report.json").read_text())
    assert {r["slide"] for r in report["slides"]} == {"s0", "s1"}


def test_rerun_skips_and_bf16_and_two_devices_agree(tiled, tmp_path):
    out = tiled / "out"
    embed_slides([tiled / "slides"], out_dir=out, params=_params(tiled), progress=False)
    path = out / "features_uni" / "s0.h5"
    mtime = path.stat().st_mtime_ns
    again = embed_slides([tiled / "slides"], out_dir=out, params=_params(tiled), progress=False)
    assert again.records["s0"]["skipped"] and path.stat().st_mtime_ns == mtime
    reference, _, _ = read_features(path)
    bf16 = embed_slides([tiled / "slides" / "s0.svs"], out_dir=out, params=_params(tiled, dtype="bf16", output_name="bf16"),
                        progress=False)
    assert bf16.ok
    low, _, attrs = read_features(out / "features_bf16" / "s0.h5")
    assert attrs["dtype"] == "bfloat16"
    cosine = (low * reference).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.98
    # Two replicas (threads, one per device) produce the same rows as one.
    two = embed_slides([tiled / "slides" / "s0.svs"], out_dir=out,
                       params=_params(tiled, devices=("cpu", "cpu"), output_name="two"), progress=False)
    assert two.ok
    np.testing.assert_allclose(read_features(out / "features_two" / "s0.h5")[0], reference, atol=1e-5)


def test_wrong_or_truncated_checkpoint_writes_nothing(tiled, tmp_path):
    data = (tiled / "uni_tiny.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    runner = CliRunner()
    for weights, arch in ((tmp_path / "cut.bin", TINY), (tiled / "uni_tiny.bin", {**TINY, "embed_dim": 64})):
        args = ["embed", str(tiled / "slides"), "--out", str(tmp_path / "out"), "--encoder", "uni",
                "--weights", str(weights), "--devices", "cpu"]
        for key, value in arch.items():
            args += ["--arch", f"{key}={value}"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert str(weights.name) in result.output
    assert not list((tmp_path / "out").rglob("*.h5"))


def test_missing_patches_fail_that_slide_only(tiled, tmp_path):
    other = tmp_path / "other.svs"
    make_sample_slide(other, width=1024, height=1024, mpp=0.25, seed=50)
    result = embed_slides([tiled / "slides" / "s1.svs", other], out_dir=tiled / "out",
                          params=_params(tiled, output_name="mixed"), progress=False)
    assert result.records["s1"]["status"] == "ok"
    assert result.records["other"]["status"] == "failed" and "histoscope tile" in result.records["other"]["error"]


def test_killed_embed_resumes(tiled, tmp_path, histoscope_cli, run_until_line):
    out = tmp_path / "out"
    slides = tmp_path / "slides"
    for i in range(3):
        make_sample_slide(slides / f"k{i}.svs", width=2048, height=2048, mpp=0.25, seed=60 + i)
    assert tile_slides([slides], out_dir=out, executor=LocalExecutor(workers=0), progress=False).ok
    cmd = histoscope_cli("embed", str(slides), "--out", str(out), "--encoder", "uni", "--weights",
                             str(tiled / "uni_tiny.bin"), "--devices", "cpu", "--dtype", "fp32", "--workers", "0",
                             "--batch-size", "4", *[a for k, v in TINY.items() for a in ("--arch", f"{k}={v}")])
    proc, line = run_until_line(cmd, lambda text: text.startswith("embed ") and text.endswith(": ok"))
    proc.kill()  # as soon as the first slide's features are complete
    proc.wait()
    assert line is not None, "the embed run never reported a finished slide"
    done = sorted(p.name for p in (out / "features_uni").glob("k*.h5"))
    assert 1 <= len(done) < 3
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    report = {r["slide"]: r for r in json.loads((out / "features_uni" / "run_report.json").read_text())["slides"]}
    assert all(report[name[:-3]].get("skipped") for name in done)
    assert len(list((out / "features_uni").glob("*.h5"))) == 3
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    for path in (out / "features_uni").glob("*.h5"):
        with h5py.File(path) as f:
            assert f["features"].shape[0] == f["coords"].shape[0]


def test_cli_run_tiles_and_embeds(tiled, tmp_path):
    # A CSV renaming the slide and giving an mpp its metadata lacks: both must reach the embed stage.
    make_sample_slide(tmp_path / "nompp.svs", width=1536, height=1536, mpp=None, seed=71)
    (tmp_path / "cohort.csv").write_text(f"path,slide_id,mpp\n{tiled / 'slides' / 's1.svs'},case-1,\n"
                                         f"{tmp_path / 'nompp.svs'},case-2,0.25\n")
    args = ["run", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "out"), "--encoder", "uni", "--weights",
            str(tiled / "uni_tiny.bin"), "--devices", "cpu", "--workers", "0"]
    args += [a for k, v in TINY.items() for a in ("--arch", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("case-1", "case-2"):
        features, coords, attrs = read_features(tmp_path / "out" / "features_uni" / f"{name}.h5")
        # UNI's native geometry: 256 px at 0.5 µm/px.
        assert features.shape == (len(coords), 48) and len(coords) > 0
        assert attrs["target_mpp"] == 0.5 and attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512
        assert (tmp_path / "out" / "masks" / f"{name}.png").exists()  # tissue outputs named by slide id


def test_embed_slide_in_three_lines_matches_pipeline(tiled):
    from histoscope.pipeline.embed import embed_slide

    encoder = load_tile_encoder("uni", weights=tiled / "uni_tiny.bin", **TINY)
    features, coords = embed_slide(tiled / "slides" / "s1.svs", encoder, batch_size=16)
    embed_slides([tiled / "slides" / "s1.svs"], out_dir=tiled / "out", params=_params(tiled), progress=False)
    expected, expected_coords, _ = read_features(tiled / "out" / "features_uni" / "s1.h5")
    np.testing.assert_array_equal(coords, expected_coords)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_clam_patch_files_at_a_coarser_level(tiled, tmp_path):
    """CLAM stores `patch_size` px at `patch_level` with its `downsample`: tiles are read there."""
    slide_path = tmp_path / "clam.tiff"
    make_sample_slide(slide_path, width=2048, height=1536, mpp=0.25, kind="tiff", downsamples=(1, 2), seed=70)
    coords = np.array([[0, 0], [512, 512], [1024, 0]], dtype=np.int64)
    (tmp_path / "out" / "patches").mkdir(parents=True)
    with h5py.File(tmp_path / "out" / "patches" / "clam.h5", "w") as f:  # CLAM's file name and attributes
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(patch_level=1, patch_size=256, downsample=np.array([2.0, 2.0]),
                        level_dim=np.array([1024, 768]), downsampled_level_dim=np.array([1024, 768]), name="clam")
    result = embed_slides([slide_path], out_dir=tmp_path / "out", params=_params(tiled, workers=0), progress=False)
    assert result.ok, result.records
    features, _, _ = read_features(tmp_path / "out" / "features_uni" / "clam.h5")
    encoder = load_tile_encoder("uni", weights=tiled / "uni_tiny.bin", **TINY)
    slide = open_slide(slide_path)
    tiles = np.stack([slide.read_region((int(x), int(y)), 1, (256, 256)) for x, y in coords])  # CLAM's read
    with torch.inference_mode():
        expected = encoder(encoder.transform(tiles)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_features(tiled):
    """`--compile` (torch.compile, Inductor) changes speed, not results. One batch holds every
    tile of the smaller slide, so Inductor compiles one graph (a second batch shape would recompile)."""
    out = tiled / "out"
    embed_slides([tiled / "slides" / "s1.svs"], out_dir=out, params=_params(tiled), progress=False)
    compiled = embed_slides([tiled / "slides" / "s1.svs"], out_dir=out,
                            params=_params(tiled, compile=True, batch_size=64, workers=0, output_name="compiled"),
                            progress=False)
    assert compiled.ok, compiled.records
    np.testing.assert_allclose(read_features(out / "features_compiled" / "s1.h5")[0],
                               read_features(out / "features_uni" / "s1.h5")[0], rtol=1e-4, atol=1e-4)
