"""The ``histoscope`` command line: start-up without torch, the model listing, the demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from histoscope.cli.main import app
from histoscope.encoders import get_tile_encoder_spec, list_tile_encoders
from histoscope.io.features_h5 import read_features
from histoscope.io.sample import make_sample_slide
from histoscope.language import get_report_model_spec, list_report_models
from histoscope.language.align import get_align_model_spec, list_align_models
from histoscope.slide import get_slide_model_spec, list_slide_models
from histoscope.tiling import read_patches

runner = CliRunner()

# Runs the CLI in a fresh interpreter, then reports which heavy modules it imported.
_PROBE = """
import sys
from histoscope.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("imported:", " ".join(m for m in ("torch", "timm", "torchvision") if m in sys.modules), "| exit:", code)
"""


@pytest.mark.parametrize("args", [["--help"], ["models"], ["info", "SLIDE"]], ids=["help", "models", "info"])
def test_quick_commands_never_import_torch(args, svs_slide):
    args = [str(svs_slide.path) if a == "SLIDE" else a for a in args]
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "imported:  | exit: 0"


def test_models_lists_every_registered_model():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    sections: dict[str, dict[str, str]] = {}  # one table per model kind (a name may be in two: conch)
    for line in result.output.splitlines():
        if line and not line.startswith(" "):
            rows = sections.setdefault(line.split(" (")[0], {})
        elif line.split():
            rows[line.split()[0]] = line
    for name in list_tile_encoders():
        spec = get_tile_encoder_spec(name)
        row = sections["Tile encoders"][name]
        assert row.split()[1] == str(spec.embed_dim)
        assert (spec.hf_repo or "file only (--weights)") in row and spec.license in row
        assert f"{spec.native_mpp:g}" in row
    for name in list_slide_models():
        assert sections["Slide models"][name].split(None, 1)[1] == get_slide_model_spec(name).description
    for name in list_align_models():
        assert sections["Image–text models"][name].split(None, 1)[1] == get_align_model_spec(name).description
    assert set(sections["Report models"]) == set(list_report_models()) and "histogpt" in list_report_models()
    for name in list_report_models():
        spec = get_report_model_spec(name)
        _, source, license, description = sections["Report models"][name].split(None, 3)
        assert source == (f"{spec.hf_repo}/{spec.hf_filename}" if spec.hf_repo else "-") and license == spec.license
        assert description.endswith(spec.description)
    slide_only = runner.invoke(app, ["models", "--kind", "slide"])
    assert slide_only.exit_code == 0
    assert "Tile encoders" not in slide_only.output and "Slide models" in slide_only.output
    assert {line.split()[0] for line in slide_only.output.splitlines()[1:]} == set(list_slide_models())
    reports_only = runner.invoke(app, ["models", "--kind", "report"])
    assert reports_only.exit_code == 0 and reports_only.output.startswith("Report models")
    assert {line.split()[0] for line in reports_only.output.splitlines()[1:]} == set(list_report_models())


@pytest.mark.integration
def test_demo_tiles_and_embeds_its_sample_slide(tmp_path):
    # The demo generates an 8192 x 6144 slide unless one is there; a small one keeps this test quick.
    out = tmp_path / "demo"
    make_sample_slide(out / "slides" / "sample.svs", width=2048, height=1536, mpp=0.25, kind="svs", seed=5)
    first = runner.invoke(app, ["demo", "--out", str(out), "--workers", "0"])
    assert first.exit_code == 0, first.output
    assert "generated" not in first.output and "RANDOM weights" in first.output
    for path in ("contours_geojson/sample.geojson", "thumbnails/sample.jpg", "masks/sample.png"):
        assert (out / path).is_file(), path
    coords, attrs = read_patches(out / "patches" / "sample_patches.h5")
    assert (attrs["patch_size"], attrs["target_mpp"], attrs["patch_size_level0"]) == (256, 0.5, 512)
    features, feature_coords, feature_attrs = read_features(out / "features_demo_vit_small_random" / "sample.h5")
    assert len(coords) > 0 and features.shape == (len(coords), 384) and np.isfinite(features).all()
    np.testing.assert_array_equal(feature_coords, coords)
    assert feature_attrs["encoder"] == "timm:vit_small_patch16_224" and feature_attrs["weights_path"] == "random:0"
    # A rerun keeps the tiles, and the random weights are seeded (seed 0): the same weights, so
    # it keeps the features too.
    again = runner.invoke(app, ["demo", "--out", str(out), "--workers", "0"])
    assert again.exit_code == 0, again.output
    tile_line, embed_line = [line for line in again.output.splitlines() if "slide(s) ok" in line]
    assert "(1 already done)" in tile_line and "(1 already done)" in embed_line
    np.testing.assert_array_equal(read_features(out / "features_demo_vit_small_random" / "sample.h5")[0], features)
