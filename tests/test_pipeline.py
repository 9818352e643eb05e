"""Batch tiling: many slides, bad ones reported, resume, no half-written files, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from histoscope.cli.main import app
from histoscope.io.sample import make_sample_slide
from histoscope.pipeline import LocalExecutor, TileParams, WorkerCrashed, collect_slides, tile_slides
from histoscope.tiling import read_patches

runner = CliRunner()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two good slides, one without mpp, one empty, one truncated, one not a slide."""
    root = tmp_path_factory.mktemp("cohort")
    make_sample_slide(root / "good_a.svs", width=2048, height=2048, mpp=0.25, seed=11)
    make_sample_slide(root / "good_b.tiff", width=2048, height=1536, mpp=0.5, kind="tiff", seed=12)
    make_sample_slide(root / "no_mpp.svs", width=2048, height=2048, mpp=None, seed=13)
    make_sample_slide(root / "empty.svs", width=1024, height=1024, mpp=0.25, empty=True)
    data = (root / "good_a.svs").read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    (root / "notes.tif").write_text("not a slide at all\n")
    return root


def _no_partial_files(root):
    return [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


def test_batch_reports_bad_slides_and_finishes_the_rest(cohort, tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tile_slides([cohort], out_dir=out, executor=LocalExecutor(workers=0), progress=False)
    records = result.records
    assert set(records) == {"good_a", "good_b", "no_mpp", "empty", "truncated", "notes"}
    assert sorted(result.failed) == ["no_mpp", "notes", "truncated"]
    assert "--slide-mpp" in records["no_mpp"]["error"] and "no_mpp.svs" in records["no_mpp"]["error"]
    assert "truncated.svs" in records["truncated"]["error"]
    assert "notes.tif" in records["notes"]["error"]
    for name in ("good_a", "good_b"):
        coords, attrs = read_patches(out / "patches" / f"{name}_patches.h5")
        assert records[name]["tiles"] == len(coords) > 0
        assert attrs["target_mpp"] == 0.5 and attrs["patch_size"] == 256
    assert read_patches(out / "patches" / "good_a_patches.h5")[1]["patch_size_level0"] == 512
    assert read_patches(out / "patches" / "good_b_patches.h5")[1]["patch_size_level0"] == 256
    # Zero tissue: success with an empty coordinate list and a warning in the record.
    coords, _ = read_patches(out / "patches" / "empty_patches.h5")
    assert coords.shape == (0, 2) and records["empty"]["status"] == "ok"
    assert "no tissue" in records["empty"]["warnings"][0]
    report = json.loads((out / "run_report.json").read_text())
    assert {r["slide"]: r["status"] for r in report["slides"]}["truncated"] == "failed"
    assert not _no_partial_files(out)
    for sub in ("thumbnails/good_a.jpg", "contours_geojson/good_a.geojson", "masks/good_a.png"):
        assert (out / sub).exists()


def test_tiles_lie_on_tissue(cohort, tmp_path):
    from histoscope import open_slide

    result = tile_slides([cohort / "good_a.svs"], out_dir=tmp_path, executor=LocalExecutor(workers=0), progress=False)
    assert result.ok
    coords, attrs = read_patches(tmp_path / "patches" / "good_a_patches.h5")
    slide = open_slide(cohort / "good_a.svs")
    tiles = slide.read_tiles(coords, size=256, mpp=0.5)
    # Stained tissue is saturated; glass is not. Every kept tile shows tissue.
    import cv2

    saturation = np.array([cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1].mean() for t in tiles])
    assert (saturation > 15).all()
    assert (attrs["tissue_fraction"] >= 0.1).all()


def test_rerun_skips_done_slides_and_redoes_changed_parameters(cohort, tmp_path):
    executor = LocalExecutor(workers=0)
    tile_slides([cohort / "good_a.svs"], out_dir=tmp_path, executor=executor, progress=False)
    patches = tmp_path / "patches" / "good_a_patches.h5"
    first_mtime = patches.stat().st_mtime_ns
    again = tile_slides([cohort / "good_a.svs"], out_dir=tmp_path, executor=executor, progress=False)
    assert again.records["good_a"]["skipped"] is True and patches.stat().st_mtime_ns == first_mtime
    changed = tile_slides([cohort / "good_a.svs"], out_dir=tmp_path, executor=executor, progress=False,
                          params=TileParams(size=224, mpp=0.5))
    assert "skipped" not in changed.records["good_a"]
    assert read_patches(patches)[1]["patch_size"] == 224


def test_slide_mpp_override_and_csv_column(cohort, tmp_path):
    csv = tmp_path / "cohort.csv"
    csv.write_text(f"path,slide_id,mpp\n{cohort / 'no_mpp.svs'},case-1,0.25\n{cohort / 'good_b.tiff'},case-2,\n")
    jobs = collect_slides([csv], slide_mpp=None)
    assert [(j.name, j.slide_mpp) for j in jobs] == [("case-1", 0.25), ("case-2", None)]
    result = tile_slides([csv], out_dir=tmp_path / "out", executor=LocalExecutor(workers=0), progress=False)
    assert result.ok
    assert read_patches(tmp_path / "out" / "patches" / "case-1_patches.h5")[1]["level0_mpp"] == 0.25
    flagged = tile_slides([cohort / "no_mpp.svs"], out_dir=tmp_path / "flag", slide_mpp=0.5,
                          executor=LocalExecutor(workers=0), progress=False)
    assert flagged.ok and flagged.records["no_mpp"]["patch_size_level0"] == 256
    assert flagged.records["no_mpp"]["tiles"] > 0


def test_duplicate_slide_names_are_an_error(cohort, tmp_path):
    (tmp_path / "good_a.tiff").write_bytes(b"x")
    with pytest.raises(ValueError, match="good_a"):
        collect_slides([cohort / "good_a.svs", tmp_path / "good_a.tiff"])


def _crash_on_two(item):
    if item == 2:
        os._exit(3)  # a hard crash, like a segfault in a native decoder
    return item * 10


def test_worker_crash_costs_only_its_item():
    results = dict(LocalExecutor(workers=2).map(_crash_on_two, [0, 1, 2, 3, 4]))
    assert isinstance(results.pop(2), WorkerCrashed)
    assert results == {0: 0, 1: 10, 3: 30, 4: 40}


def test_cli_tile_exit_status_and_parallel_workers(cohort, tmp_path):
    result = runner.invoke(app, ["tile", str(cohort / "good_a.svs"), str(cohort / "good_b.tiff"),
                                 "--out", str(tmp_path / "ok"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "2 slide(s) ok" in result.output
    bad = runner.invoke(app, ["tile", str(cohort / "good_a.svs"), str(cohort / "notes.tif"), "--out", str(tmp_path / "bad"),
                              "--workers", "0"])
    assert bad.exit_code == 1
    assert (tmp_path / "bad" / "patches" / "good_a_patches.h5").exists()


def test_cli_info_and_sample_slide(tmp_path):
    made = runner.invoke(app, ["sample-slide", str(tmp_path / "s.svs"), "--width", "1024", "--height", "768"])
    assert made.exit_code == 0, made.output
    info = runner.invoke(app, ["info", str(tmp_path / "s.svs"), "--json"])
    data = json.loads(info.output)
    assert data["dimensions"] == [1024, 768] and data["mpp"] == 0.25 and data["backend"] == "tiff"
    assert data["vendor"] == "aperio" and "label" in data["associated_images"]
    text = runner.invoke(app, ["info", str(tmp_path / "s.svs")])
    assert "0.2500 µm/px" in text.output
    missing = runner.invoke(app, ["info", str(tmp_path / "nope.svs")])
    assert missing.exit_code == 2 and "nope.svs" in missing.output


def test_killed_run_resumes_without_half_written_files(tmp_path, histoscope_cli, run_until_line):
    slides = tmp_path / "slides"
    for i in range(4):
        make_sample_slide(slides / f"s{i}.svs", width=3072, height=3072, mpp=0.25, seed=20 + i)
    out = tmp_path / "out"
    cmd = histoscope_cli("tile", str(slides), "--out", str(out), "--workers", "0")
    proc, line = run_until_line(cmd, lambda text: text.startswith("tile ") and text.endswith(": ok"))
    proc.kill()  # as soon as the first slide is recorded
    proc.wait()
    assert line is not None, "the tile run never reported a finished slide"
    done_before = sorted(p.name for p in (out / "patches").glob("*.h5"))
    assert 1 <= len(done_before) < 4
    for path in (out / "patches").glob("*.h5"):  # whatever exists is complete
        with h5py.File(path) as f:
            assert f["coords"].shape[1] == 2
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report_data = json.loads((out / "run_report.json").read_text())["slides"]
    skipped = {r["slide"] for r in report_data if r.get("skipped")}
    assert {name.replace("_patches.h5", "") for name in done_before} <= skipped
    assert len(list((out / "patches").glob("*.h5"))) == 4
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def _sparse_gigapixel_slide(path, size=150_000, tissue=(40_000, 60_000, 56_000, 72_000)):
    """A 150k x 150k pyramid (levels 1/4/16/64) whose tiles are empty (glass) except a
    tissue rectangle of real H&E; written in a second, as scanners store sparse slides."""
    import imagecodecs
    import tifffile

    from histoscope.io.sample import sample_texture

    texture = np.ascontiguousarray(np.tile(sample_texture(), (2, 2, 1))[:256, :256])
    jpeg = bytes(imagecodecs.jpeg8_encode(texture, level=80))
    x0, y0, x1, y1 = tissue
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, ds in enumerate((1, 4, 16, 64)):
            width, height = size // ds, size // ds

            def tiles():
                for ty in range(-(-height // 256)):
                    for tx in range(-(-width // 256)):
                        x, y = tx * 256 * ds, ty * 256 * ds
                        yield jpeg if (x0 <= x < x1 and y0 <= y < y1) else b""

            tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(256, 256), compression=7,
                      photometric="ycbcr", resolution=(1e4 / (0.25 * ds),) * 2, resolutionunit="CENTIMETER",
                      subfiletype=0 if index == 0 else 1, metadata=None)


@pytest.mark.slow
def test_memory_stays_bounded_on_150k_slide(tmp_path):
    path = tmp_path / "huge.tiff"
    _sparse_gigapixel_slide(path)
    script = (
        "from histoscope.pipeline import LocalExecutor, tile_slides\n"
        f"r = tile_slides([{str(path)!r}], out_dir={str(tmp_path / 'out')!r}, executor=LocalExecutor(workers=0), progress=False)\n"
        # VmHWM is this process's own peak: ru_maxrss would carry over the (v)forking parent's
        # RSS across exec, i.e. the pytest worker's.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(r.records['huge']['tiles'], int(hwm.split()[1]) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tiles, peak_mb = map(int, done.stdout.split())
    # Level 0 is 67 GB of pixels; the run must stay far below even one level-1 read (4.2 GB).
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB"
    # The 16k x 12k px tissue rectangle holds 32 x 24 tiles of 512 level-0 px.
    assert abs(tiles - 32 * 24) <= 2 * (32 + 24)
