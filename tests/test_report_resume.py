"""``histoscope report`` resumes: a rerun with the same model and settings skips the slides
already written (their files untouched) and its tables list every slide once; another model
or other settings regenerate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histoscope.cli.main import app
from histoscope.predict.report import DecodeSettings, report_text_path, reports_path, write_reports

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = DecodeSettings(max_new_tokens=6)


def _rows(out: Path) -> list[tuple[str, str]]:
    with open(reports_path(out), newline="") as fh:
        return [(r["slide_id"], r["report"]) for r in csv.DictReader(fh)]


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    """Each slide's report: its bytes and inode (a file rewritten by rename gets a new inode)."""
    return {p.stem: (p.read_bytes(), p.stat().st_ino) for p in sorted(out.glob("*.txt"))}


def test_a_rerun_skips_written_slides_and_merges_the_tables(tmp_path, tiny_report_model):
    weights, tokenizer, files = tiny_report_model(tmp_path, slides=4)
    first3, d = files[:3], files[3]

    def report(features, out="out", **kwargs):
        options = {"model": weights, "tokenizer": tokenizer, "settings": SETTINGS, "batch_size": 2, "device": "cpu",
                   **kwargs}
        return write_reports(features, out_dir=tmp_path / out, **options)

    fresh = report(files, out="fresh")  # the reference: every slide in one run
    assert not fresh.failed and not fresh.skipped and len(fresh.reports) == 4
    out = tmp_path / "out"

    first = report(first3)
    before = _files(out)
    assert sorted(before) == ["s0", "s1", "s2"] and not first.skipped
    again = report(files)  # three already written, one new
    assert again.skipped == ["s0", "s1", "s2"]
    after = _files(out)
    assert {k: after[k] for k in before} == before  # same bytes, never rewritten
    assert _rows(out) == _rows(tmp_path / "fresh")  # every slide once, as a fresh run lists them
    assert json.loads(reports_path(out, ".json").read_text())["reports"] == \
           json.loads(reports_path(tmp_path / "fresh", ".json").read_text())["reports"]

    only_d = report([d])  # a run of one slide keeps the earlier runs' reports in the tables
    assert only_d.skipped == ["s3"] and len(only_d.reports) == 4 and _rows(out) == _rows(tmp_path / "fresh")
    assert _files(out) == after

    report_text_path(out, "s1").unlink()  # an output removed since: that slide only is written again
    redone = report(files)
    assert redone.skipped == ["s0", "s2", "s3"]
    assert _rows(out) == _rows(tmp_path / "fresh")
    assert report_text_path(out, "s1").read_bytes() == report_text_path(tmp_path / "fresh", "s1").read_bytes()

    # other decoding settings: every slide regenerated; slides of the old settings leave the tables
    shorter = report(first3[:2], settings=DecodeSettings(max_new_tokens=2))
    assert not shorter.skipped and [s for s, _ in _rows(out)] == ["s0", "s1"]
    assert all(len(text.split()) <= 2 for text in shorter.reports.values())
    assert report_text_path(out, "s0").stat().st_ino != after["s0"][1]
    old = json.loads(reports_path(tmp_path / "fresh", ".json").read_text())["settings_sha256"]
    assert json.loads(reports_path(out, ".json").read_text())["settings_sha256"] != old

    # back to the first settings: s2 and s3 are still theirs; s0 and s1 are regenerated
    back = report(files)
    assert back.skipped == ["s2", "s3"] and _rows(out) == _rows(tmp_path / "fresh")

    # another model (same sizes, other weights): everything regenerated
    other, _, _ = tiny_report_model(tmp_path / "other", seed=1, slides=0)
    assert not report(files, model=other).skipped


def test_a_failed_slide_is_retried_and_the_cli_says_what_was_skipped(tmp_path, tiny_report_model):
    weights, tokenizer, files = tiny_report_model(tmp_path, slides=3)
    moved = tmp_path / "elsewhere.h5"
    shutil.move(files[2], moved)  # a missing file fails its slide only
    args = ["report", *map(str, files), "--model", str(weights), "--tokenizer", str(tokenizer), "--out",
            str(tmp_path / "out"), "--max-new-tokens", "4", "--device", "cpu"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "FAILED s2" in result.output
    assert [s for s, _ in _rows(tmp_path / "out")] == ["s0", "s1"]
    before = _files(tmp_path / "out")

    shutil.move(moved, files[2])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 report(s) (2 from an earlier run)" in result.output
    assert [s for s, _ in _rows(tmp_path / "out")] == ["s0", "s1", "s2"]
    assert {k: v for k, v in _files(tmp_path / "out").items() if k != "s2"} == before
    records = json.loads((tmp_path / "out" / "run_report.json").read_text())["slides"]
    assert sorted(r["slide"] for r in records) == ["s0", "s1", "s2"] and all(r["status"] == "ok" for r in records)
    assert not list((tmp_path / "out").glob(".*partial*"))
