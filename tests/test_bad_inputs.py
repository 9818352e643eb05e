"""Bad input through the command line: one line naming the file or flag and the fix, the right
exit status, no traceback, nothing half-written, and a batch that finishes its good slides.

Exit status: 2 for bad input or usage (nothing done), 1 for a batch with failed slides,
128 + signal for an interrupted run. Also here, because they are how bad input used to
hang or orphan a run: hole assignment that cannot go quadratic (an absurd mpp segments at
level 0), seeded random weights, the output-folder lock, and workers that end with a
killed run.
"""

from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histoscope.cli.main import app
from histoscope.encoders import load_tile_encoder
from histoscope.io.features_h5 import read_features, write_features
from histoscope.io.sample import make_sample_slide
from histoscope.pipeline import LocalExecutor, TileParams, tile_slides
from histoscope.slide import load_slide_model
from histoscope.slide.outputs import ClassOutputs
from histoscope.slide.trained import save_trained_model
from histoscope.tissue.mask import TissueMask, _signed_area
from histoscope.train.synthetic import GEOMETRY, make_mil_cohort

runner = CliRunner()

TINY_UNI = {"depth": 1, "embed_dim": 32, "num_heads": 1}
TINY_ARCH = [arg for key, value in TINY_UNI.items() for arg in ("--arch", f"{key}={value}")]


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def batch_failed(result) -> list[str]:
    """Assert a batch that finished with failed slides: status 1, no traceback; its FAILED lines."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    return sorted(line for line in _lines(result) if line.startswith("FAILED"))


def input_error(result, *needles: str) -> str:
    """Assert a bad-input exit: status 2, one ``error:`` line holding every needle, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = _lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_torch_thread):
    """Slides (good, without mpp, with an absurd metadata mpp), their tiles, a small MIL cohort
    and a trained checkpoint for its features."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_sample_slide(root / "slides" / "good.svs", width=1024, height=1024, mpp=0.25, seed=80)
    make_sample_slide(root / "slides" / "other.svs", width=1024, height=768, mpp=0.25, seed=81)
    # Metadata claiming 1000 µm/px (a unit mix-up): the same bytes with "MPP = 1000".
    data = (root / "slides" / "other.svs").read_bytes()
    assert data.count(b"MPP = 0.2500") >= 1
    (root / "odd").mkdir()
    (root / "odd" / "absurd.svs").write_bytes(data.replace(b"MPP = 0.2500", b"MPP = 1000.0"))
    (root / "empty").mkdir()
    (root / "afile").write_text("not a folder\n")
    assert tile_slides([root / "slides"], out_dir=root / "out", executor=LocalExecutor(workers=0),
                       progress=False).ok
    cohort = make_mil_cohort(root / "cohort", slides=8, dim=8, tiles=(6, 12), seed=3)
    model = load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True)
    save_trained_model(root / "checkpoint.pt", model=model, model_name="abmil", arch={"tiny": True}, in_dim=8,
                       outputs=ClassOutputs(["negative", "positive"]))
    return root


def _train_args(root: Path, features: Path, out: Path, csv_path: Path | None = None) -> list[str]:
    return ["train", f"csv={csv_path or root / 'cohort' / 'slides.csv'}", f"features_dir={features}",
            f"out_dir={out}", "tiny=true", "epochs=1", "folds=2", "device=cpu", "bootstrap=10"]


def _copy_features(root: Path, folder: Path) -> Path:
    folder.mkdir()
    for path in (root / "cohort" / "features_synthetic").glob("*.h5"):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


# ---- slide arguments: nothing to do is an error, and CSVs name themselves ----------------

def test_nothing_to_do_is_an_error(root, tmp_path):
    input_error(runner.invoke(app, ["tile", str(root / "empty"), "-o", str(tmp_path / "out")]),
                str(root / "empty"), "no slide files")
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,mpp\n")
    input_error(runner.invoke(app, ["tile", str(header_only), "-o", str(tmp_path / "out")]),
                str(header_only), "no slides", "add one row")
    assert not (tmp_path / "out").exists()


def test_csv_that_is_not_utf8_is_named(root, tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("path,slide_id\nslides/good.svs,Gewebe-Ä\n".encode("latin-1"))
    input_error(runner.invoke(app, ["tile", str(latin), "-o", str(tmp_path / "out")]), str(latin), "UTF-8")
    recipe_table = tmp_path / "table.csv"
    recipe_table.write_bytes("slide_id,label\nslide_000,négatif\n".encode("latin-1"))
    out = tmp_path / "run"
    input_error(runner.invoke(app, _train_args(root, root / "cohort" / "features_synthetic", out, recipe_table)),
                str(recipe_table), "UTF-8")
    assert not out.exists()


# ---- absurd resolutions ------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--slide-mpp", "-1"], "'--slide-mpp'"),
    (["--slide-mpp", "1e-6"], "'--slide-mpp'"),
    (["--slide-mpp", "1000"], "'--slide-mpp'"),
    (["--mpp", "1000"], "'--mpp'"),
    (["--size", "0"], "'--size'"),
    (["--min-tissue", "1.5"], "'--min-tissue'"),
    (["--backend", "foo"], "'--backend'"),
], ids=["negative", "tiny", "huge", "target", "size", "min-tissue", "backend"])
def test_tile_usage_errors_name_the_flag(root, tmp_path, args, needle):
    line = input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(tmp_path / "o"),
                                           *args]), needle)
    assert line.endswith(" tile --help`)")
    assert not (tmp_path / "o").exists()


def test_overlap_not_below_the_tile_size_fails_up_front(root, tmp_path):
    input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(tmp_path / "o"),
                                    "--size", "64", "--overlap", "64"]), "overlap", "[0, 64)")
    assert not (tmp_path / "o").exists()


def test_absurd_csv_mpp_names_its_row(root, tmp_path):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{root / 'slides' / 'good.svs'},0.25\n{root / 'slides' / 'other.svs'},1000\n")
    input_error(runner.invoke(app, ["tile", str(table), "-o", str(tmp_path / "o")]),
                f"{table}:3", "mpp", "1000 µm/px", "outside")


def test_absurd_metadata_mpp_fails_that_slide_and_the_batch_finishes(root, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), str(root / "odd" / "absurd.svs"),
                                 "-o", str(out), "--workers", "0"])
    failed = batch_failed(result)
    assert len(failed) == 1 and "absurd.svs" in failed[0] and "1000 µm/px" in failed[0]
    assert "--slide-mpp" in failed[0]
    assert (out / "patches" / "good_patches.h5").is_file() and not (out / "patches" / "absurd_patches.h5").exists()
    # The fix the message gives works.
    fixed = runner.invoke(app, ["tile", str(root / "odd" / "absurd.svs"), "-o", str(out), "--slide-mpp", "0.25"])
    assert fixed.exit_code == 0, fixed.output


# ---- output folders ----------------------------------------------------------------------

def test_output_path_that_is_a_file_in_every_stage(root, tmp_path):
    afile = root / "afile"
    input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(afile)]),
                str(afile), "is a file", "--out")
    input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(afile / "below")]),
                str(afile / "below"), "--out")
    input_error(runner.invoke(app, ["embed", str(root / "slides"), "-o", str(afile), "--encoder", "uni",
                                    "--weights", "random", "--devices", "cpu", "--workers", "0", *TINY_ARCH]),
                str(afile), "--out")
    input_error(runner.invoke(app, _train_args(root, root / "cohort" / "features_synthetic", afile)),
                str(afile), "--out")
    input_error(runner.invoke(app, ["predict", "-c", str(root / "checkpoint.pt"), "-f",
                                    str(root / "cohort" / "features_synthetic"), "-o", str(afile),
                                    "--device", "cpu"]), str(afile), "--out")
    assert afile.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder(root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(locked)]),
                str(locked), "not writable", "--out")


def test_second_run_into_one_folder_names_the_first(root, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from histoscope.io.outdir import output_folder\n"
         f"with output_folder({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        input_error(runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(out)]),
                    str(out), f"PID {holder.pid}", "--out")
        assert not (out / "patches").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Released with its process: the same command now runs.
    done = runner.invoke(app, ["tile", str(root / "slides" / "good.svs"), "-o", str(out), "--workers", "0"])
    assert done.exit_code == 0, done.output


# ---- encoders and devices ----------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--encoder", "nosuch"], ["'nosuch'", "Registered"]),
    (["--arch", "depht=2"], ["depht", "--arch"]),
    (["--arch", "depth"], ["'--arch'", "KEY=VALUE"]),
    (["--batch-size", "0"], ["'--batch-size'"]),
    (["--weights", "random:x"], ["random:x", "random:1"]),
    (["--dtype", "fp8"], ["'--dtype'", "bf16"]),
], ids=["encoder", "arch-typo", "arch-form", "batch-size", "seed", "dtype"])
def test_embed_usage_errors(root, tmp_path, args, needles):
    base = ["embed", str(root / "slides"), "-o", str(tmp_path / "o"), "--encoder", "uni", "--weights", "random",
            "--devices", "cpu", "--workers", "0", *TINY_ARCH]
    input_error(runner.invoke(app, [*base, *args]), *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_names_the_flag_of_each_command(root, tmp_path):
    line = input_error(runner.invoke(app, ["embed", str(root / "slides"), "-o", str(tmp_path / "o"), "--encoder",
                                           "uni", "--weights", "random", "--devices", "cuda", *TINY_ARCH]),
                       "--devices cuda", "--devices cpu")
    assert "--device " not in line
    input_error(runner.invoke(app, ["predict", "-c", str(root / "checkpoint.pt"), "-f",
                                    str(root / "cohort" / "features_synthetic"), "-o", str(tmp_path / "p"),
                                    "--device", "cuda:1"]), "--device cuda:1", "--device cpu")
    out = tmp_path / "run"
    input_error(runner.invoke(app, [*_train_args(root, root / "cohort" / "features_synthetic", out), "device=cuda"]),
                "device (--device) cuda", "cpu")
    assert not out.exists()


def test_info_and_models_usage(root):
    input_error(runner.invoke(app, ["info", str(root / "slides" / "good.svs"), "--backend", "foo"]),
                "'--backend'", "openslide")
    input_error(runner.invoke(app, ["models", "--kind", "foo"]), "'--kind'", "tile, slide, align, report, all")
    input_error(runner.invoke(app, ["info", str(root / "slides" / "good.svs"), "--slide-mpp", "-1"]),
                "'--slide-mpp'")
    text = runner.invoke(app, ["info", str(root / "odd" / "absurd.svs")])
    assert text.exit_code == 0 and "implausible: pass --slide-mpp" in text.output


# ---- recipes and features files for train ------------------------------------------------

def test_broken_yaml_recipe(root, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("epochs: [1\nlr: 0.1\n")
    input_error(runner.invoke(app, ["train", str(recipe)]), str(recipe), "not valid YAML", "line")
    input_error(runner.invoke(app, ["train", "csv=a.csv", "epochs=[1"]), "epochs=[1", "quote")


def test_messages_keep_their_quotes(root, tmp_path):
    out = tmp_path / "run"
    line = input_error(runner.invoke(app, [*_train_args(root, root / "cohort" / "features_synthetic", out),
                                           "model=abmill"]), "'abmill'", "did you mean abmil")
    assert line.startswith("error: unknown slide model 'abmill'")
    assert not out.exists()


def _nan(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        values = f["features"][:]
        values[3, 2] = np.nan
        values[5, 0] = np.inf
        f["features"][:] = values


def _no_tiles(path: Path) -> None:
    write_features(path, np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), coords_attrs=GEOMETRY.attrs())


def _no_coords(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["coords"]


def _other_dim(path: Path) -> None:
    features, coords, _ = read_features(path)
    write_features(path, np.ones((len(features), 16), np.float32), coords, coords_attrs=GEOMETRY.attrs())


@pytest.mark.parametrize("damage, needles", [
    (_nan, ["2 tile(s) have NaN or Inf", "row 3", "histoscope embed"]),
    (_no_tiles, ["no tiles", "drop the slide"]),
    (_no_coords, ["no 'coords'", "histoscope embed"]),
    (_other_dim, ["16-dim features where 8", "one encoder"]),
], ids=["nan", "no-tiles", "no-coords", "mixed-dim"])
def test_train_rejects_a_bad_features_file_before_writing(root, tmp_path, damage, needles):
    features = _copy_features(root, tmp_path / "features")
    damage(features / "slide_005.h5")
    out = tmp_path / "run"
    input_error(runner.invoke(app, _train_args(root, features, out)), str(features / "slide_005.h5"), *needles)
    assert not out.exists()


# ---- predict: a bad slide fails, the others finish ---------------------------------------

def test_predict_fails_the_slide_with_nan_features_only(root, tmp_path):
    features = _copy_features(root, tmp_path / "features")
    _nan(features / "slide_002.h5")
    _no_coords(features / "slide_004.h5")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "-c", str(root / "checkpoint.pt"), "-f", str(features), "-o", str(out),
                                 "--device", "cpu"])
    failed = batch_failed(result)
    assert len(failed) == 2
    assert failed[0].startswith("FAILED slide_002") and "NaN or Inf" in failed[0] and "slide_002.h5" in failed[0]
    assert failed[1].startswith("FAILED slide_004") and "no 'coords'" in failed[1]
    with open(out / "predictions.csv", newline="") as fh:
        rows = {row["slide_id"]: row for row in csv.DictReader(fh)}
    assert sorted(rows) == [f"slide_{i:03d}" for i in (0, 1, 3, 5, 6, 7)]
    assert all(np.isfinite(float(row["prob_positive"])) for row in rows.values())
    assert set(json.loads((out / "predictions.json").read_text())["failed"]) == {"slide_002", "slide_004"}
    assert not (out / "slide_002").exists()


@pytest.mark.parametrize("content", ["text", "empty"])
def test_predict_with_a_bad_checkpoint_is_one_line(root, tmp_path, content):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_text("slide_id,label\n" if content == "text" else "")
    input_error(runner.invoke(app, ["predict", "-c", str(checkpoint), "-f", str(root / "cohort" /
                                    "features_synthetic"), "-o", str(tmp_path / "p")]), str(checkpoint))
    assert not (tmp_path / "p").exists()


def test_embeddings_that_are_not_finite_fail_their_slide(root, tmp_path):
    encoder = load_tile_encoder("uni", weights="random", **TINY_UNI)
    state = encoder.model.state_dict()
    state["norm.weight"][0] = float("nan")  # every embedding gets a NaN, as an fp16 overflow would
    torch.save(state, tmp_path / "nan.bin")
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    for path in (root / "out" / "patches").glob("*.h5"):
        (out / "patches" / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(app, ["embed", str(root / "slides"), "-o", str(out), "--encoder", "uni", "--weights",
                                 str(tmp_path / "nan.bin"), "--devices", "cpu", "--workers", "0", *TINY_ARCH])
    failed = batch_failed(result)
    assert len(failed) == 2 and all("NaN or Inf embeddings" in line and "--dtype fp32" in line for line in failed)
    assert not list((out / "features_uni").glob("*.h5"))


# ---- random weights are seeded -----------------------------------------------------------

_BUILD = ("import sys; from histoscope.encoders import load_tile_encoder\n"
          "print(load_tile_encoder('uni', weights=sys.argv[1], depth=1, embed_dim=32, num_heads=1).weights_sha256)")


def test_random_weights_are_the_same_in_every_process(root, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    here = load_tile_encoder("uni", weights="random", **TINY_UNI)
    torch.manual_seed(123)
    load_tile_encoder("uni", weights="random", **TINY_UNI)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    other = subprocess.run([sys.executable, "-c", _BUILD, "random:0"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == here.weights_sha256 and len(here.weights_sha256) == 64
    again = load_tile_encoder("uni", weights="random", **TINY_UNI)
    for (name, a), b in zip(here.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    seed_one = load_tile_encoder("uni", weights="random:1", **TINY_UNI)
    assert seed_one.weights_sha256 != here.weights_sha256 and seed_one.weights_source == "random:1"
    assert not torch.equal(seed_one.model.patch_embed.proj.weight, here.model.patch_embed.proj.weight)

    # So a rerun with the same random weights keeps the finished slides.
    args = ["embed", str(root / "slides" / "good.svs"), "-o", str(root / "out"), "--encoder", "uni", "--weights",
            "random", "--devices", "cpu", "--dtype", "fp32", "--workers", "0", *TINY_ARCH]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "(0 already done)" in first.output, first.output
    features, _, attrs = read_features(root / "out" / "features_uni" / "good.h5")
    assert attrs["weights_sha256"] == here.weights_sha256 and attrs["weights_path"] == "random:0"
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "(1 already done)" in second.output, second.output
    reseeded = runner.invoke(app, [*args[:7], "random:1", *args[8:]])
    assert reseeded.exit_code == 0 and "(0 already done)" in reseeded.output, reseeded.output
    assert not np.array_equal(read_features(root / "out" / "features_uni" / "good.h5")[0], features)


# ---- hole assignment cannot go quadratic ---------------------------------------------------

def _reference_parents(polygons) -> list[tuple[int, int]]:
    """(polygon holding the hole, innermost exterior around it) per hole, the quadratic way:
    every hole's first vertex tested against every exterior, smallest first."""
    exteriors = [p.exterior for p in polygons]
    order = np.argsort([abs(_signed_area(e)) for e in exteriors])
    pairs = []
    for index, polygon in enumerate(polygons):
        for hole in polygon.holes:
            point = (float(hole[0, 0]), float(hole[0, 1]))
            inside = [int(i) for i in order
                      if cv2.pointPolygonTest(exteriors[i].astype(np.float32)[:, None], point, False) > 0]
            pairs.append((index, inside[0] if inside else -1))
    return pairs


def _nested_mask(rng) -> np.ndarray:
    """Rings inside holes inside rings, plus noise: pieces within pieces' holes."""
    mask = np.zeros((120, 160), bool)
    yy, xx = np.mgrid[:120, :160]
    for cy, cx in ((40, 45), (70, 110)):
        r = np.hypot(yy - cy, xx - cx)
        for outer, inner in ((34, 26), (20, 13), (8, 4)):
            mask |= (r < outer) & (r >= inner)
    mask |= rng.random(mask.shape) < 0.04
    mask[5:9, 140:150] = True
    mask[6:8, 144:146] = False
    return mask


def test_holes_go_to_the_innermost_piece_around_them(tmp_path):
    rng = np.random.default_rng(7)
    for trial in range(3):
        mask = _nested_mask(rng)
        polygons = TissueMask(mask=mask, mpp=8.0, downsample=16.0, level0_size=(160 * 16, 120 * 16)).contours()
        pairs = _reference_parents(polygons)
        assert len(pairs) >= 7  # the rings' holes, the small frame's, and holes in the noise
        assert all(held == expected for held, expected in pairs), (trial, pairs)


def test_thousands_of_holes_assign_without_pairwise_tests(monkeypatch):
    """10,000 pieces each with a hole: pairwise tests would be 10^8 point-in-polygon calls
    (many minutes); the assignment makes none, and every hole lands in its own piece."""
    n = 100
    calls = 0
    real = cv2.pointPolygonTest

    def counted(*args):
        nonlocal calls
        calls += 1
        if calls > n * n:  # more than one test per hole: fail now rather than after minutes
            raise AssertionError("holes are being tested against many exteriors")
        return real(*args)

    monkeypatch.setattr(cv2, "pointPolygonTest", counted)
    cell = np.zeros((4, 4), bool)
    cell[:3, :3] = True
    cell[1, 1] = False  # a 3 x 3 ring of tissue around one glass pixel, then a glass gap
    mask = np.tile(cell, (n, n))
    polygons = TissueMask(mask=mask, mpp=8.0, downsample=1.0, level0_size=(4 * n, 4 * n)).contours()
    assert len(polygons) == n * n and calls <= n * n
    for polygon in polygons:
        assert len(polygon.holes) == 1
        (x0, y0), (x1, y1) = polygon.exterior.min(0), polygon.exterior.max(0)
        hx, hy = polygon.holes[0].mean(0)
        assert x0 < hx < x1 and y0 < hy < y1 and x1 - x0 <= 3


def test_absurd_mpp_is_refused_before_segmentation():
    with pytest.raises(ValueError, match="mpp is 1000 µm/px, outside"):
        TileParams(mpp=1000.0)
    with pytest.raises(ValueError, match="seg_mpp is 1e-06 µm/px"):
        TileParams(seg_mpp=1e-6)


# ---- workers end with a killed run ---------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (from /proc), with its command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = _cmdline(child)
            todo.append(child)
    return found


def _still_running(pids, timeout: float) -> list[int]:
    """The ``pids`` that have not ended within ``timeout`` s, waiting on their pidfds."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    pending, deadline = set(fds), time.monotonic() + timeout
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pending), [], [], left)
        pending -= set(ready)
    for fd in fds:
        os.close(fd)
    return sorted(fds[fd] for fd in pending)


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A small slide, then three larger ones, tiled at 32 px (a few hundred tiles each): a run
    reports its first slide soon and is still busy with the others when it is killed."""
    root = tmp_path_factory.mktemp("busy")
    for i in range(4):
        side = 768 if i == 0 else 2048
        make_sample_slide(root / "slides" / f"s{i}.svs", width=side, height=side, mpp=0.25, seed=90 + i)
    assert tile_slides([root / "slides"], out_dir=root / "tiled", params=TileParams(size=32),
                       executor=LocalExecutor(workers=0), progress=False).ok
    return root


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to wait on other processes")
@pytest.mark.parametrize("stage", ["tile", "embed"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_no_processes(busy, tmp_path, stage, sig, histoscope_cli, run_until_line):
    if stage == "tile":
        out = tmp_path / "out"
        cmd = histoscope_cli("tile", str(busy / "slides"), "-o", str(out), "--workers", "2")
        worker_mark = "spawn_main"
    else:
        out = tmp_path / "emb"
        (out / "patches").mkdir(parents=True)
        for path in (busy / "tiled" / "patches").glob("*.h5"):
            (out / "patches" / path.name).write_bytes(path.read_bytes())
        cmd = histoscope_cli("embed", str(busy / "slides"), "-o", str(out), "--encoder", "uni", "--weights",
                             "random", "--devices", "cpu", "--dtype", "fp32", "--workers", "2", "--batch-size", "8",
                             *TINY_ARCH)
        worker_mark = "forkserver"
    proc, line = run_until_line(cmd, lambda text: text.startswith(f"{stage} 1/4 "))
    descendants = _descendants(proc.pid)
    try:
        assert line is not None, "the run never reported a finished slide"
        assert sum(worker_mark in c for c in descendants.values()) >= 2, descendants
        os.kill(proc.pid, sig)
        returncode = proc.wait(timeout=120)
        survivors = _still_running(descendants, timeout=60)
        assert not survivors, {pid: descendants[pid] for pid in survivors}
        stderr = proc.stderr.read().decode(errors="replace")  # at its end now: no process holds the pipe
        if sig == signal.SIGTERM:  # handled like Ctrl-C: an orderly stop
            assert returncode == 128 + signal.SIGTERM, stderr
            assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
            assert not [p for p in out.rglob("*") if ".partial" in p.name]
        else:
            assert returncode == -signal.SIGKILL
    finally:
        for pid, command in descendants.items():  # a failed test leaves no orphans either
            if _cmdline(pid) == command:
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
