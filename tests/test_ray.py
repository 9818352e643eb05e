"""The Ray executor on a private loopback-only head: same files as local, exactly once, nothing lost.

One head serves the whole module (started and stopped by ``LoopbackHead``, never ``ray stop``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("ray")

from histoscope.io.features_h5 import read_features  # noqa: E402
from histoscope.io.sample import make_sample_slide  # noqa: E402
from histoscope.pipeline import LocalExecutor, TileParams, collect_slides, run_batch, tile_slide, tile_slides  # noqa: E402
from histoscope.pipeline.embed import EmbedParams, embed_slides  # noqa: E402
from histoscope.pipeline.ray_executor import RayExecutor  # noqa: E402
from histoscope.pipeline.ray_head import LoopbackHead  # noqa: E402
from histoscope.tiling import read_patches  # noqa: E402

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}
pytestmark = pytest.mark.xdist_group("ray_head")  # one head for the module, on one xdist worker
SLIDES = ("a", "b", "c")


@pytest.fixture(scope="module")
def head():
    with LoopbackHead(num_cpus=2, object_store_mb=80) as started:
        yield started


@pytest.fixture(scope="module")
def executor(head):
    runner = RayExecutor(address=head.address, max_retries=2)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three slides, tiled and embedded by the local executor (the reference)."""
    root = tmp_path_factory.mktemp("ray")
    for i, name in enumerate(SLIDES):
        make_sample_slide(root / "slides" / f"{name}.svs", width=1536 + 512 * i, height=1024, mpp=0.25, seed=70 + i)
    local = root / "local"
    assert tile_slides([root / "slides"], out_dir=local, executor=LocalExecutor(workers=0), progress=False).ok
    assert embed_slides([root / "slides"], out_dir=local, params=_embed_params(), progress=False).ok
    return root


def _embed_params() -> EmbedParams:
    return EmbedParams(encoder="uni", weights="random:7", arch=TINY, workers=0, batch_size=8, dtype="fp32",
                       devices=("cpu",))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run_report.json"}


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def _report(folder: Path) -> list[dict]:
    return json.loads((folder / "run_report.json").read_text())["slides"]


def _assert_same_tiles(out: Path, reference: Path) -> None:
    for name in SLIDES:
        coords, attrs = read_patches(out / "patches" / f"{name}_patches.h5")
        expected, expected_attrs = read_patches(reference / "patches" / f"{name}_patches.h5")
        assert len(coords) > 0
        np.testing.assert_array_equal(coords, expected)
        assert attrs.keys() == expected_attrs.keys()
        for key, value in expected_attrs.items():
            np.testing.assert_array_equal(attrs[key], value)


def _listening_sockets(pids: list[int]) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets ``pids`` listen on."""
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = fields[1]
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found += [listening[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in listening]
    return found


def test_tile_and_embed_on_ray_equal_local_and_rerun_redoes_nothing(cohort, executor):
    out = cohort / "on_ray"
    tiled = tile_slides([cohort / "slides"], out_dir=out, executor=executor, progress=False)
    assert tiled.ok, tiled.records
    embedded = embed_slides([cohort / "slides"], out_dir=out, params=_embed_params(), progress=False,
                            executor=executor)
    assert embedded.ok, embedded.records
    _assert_same_tiles(out, cohort / "local")
    for name in SLIDES:
        features, coords, attrs = read_features(out / "features_uni" / f"{name}.h5")
        expected, expected_coords, expected_attrs = read_features(cohort / "local" / "features_uni" / f"{name}.h5")
        np.testing.assert_array_equal(coords, expected_coords)
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
        assert attrs["weights_sha256"] == expected_attrs["weights_sha256"]
        assert embedded.records[name]["tiles"] == len(expected)
    for folder in (out, out / "features_uni"):
        assert sorted(r["slide"] for r in _report(folder)) == sorted(SLIDES)
    assert not _partials(out)

    before = _digests(out)
    again_tiled = tile_slides([cohort / "slides"], out_dir=out, executor=executor, progress=False)
    again = embed_slides([cohort / "slides"], out_dir=out, params=_embed_params(), progress=False, executor=executor)
    assert all(r.get("skipped") for r in (*again_tiled.records.values(), *again.records.values()))
    assert _digests(out) == before


def test_head_and_its_workers_listen_on_loopback_only(head, executor, cohort):
    # Workers exist once tasks have run (this module's other tests, or this one).
    assert tile_slides([cohort / "slides" / "a.svs"], out_dir=cohort / "one", executor=executor, progress=False).ok
    addresses = _listening_sockets(head.processes())
    gcs_port = int(head.address.rsplit(":", 1)[1])
    assert any(int(a.rsplit(":", 1)[1], 16) == gcs_port for a in addresses), addresses
    loopback = ("0100007F", "0000000000000000FFFF00000100007F")  # 127.0.0.1, ::ffff:127.0.0.1
    assert len(addresses) >= 3 and all(a.rsplit(":", 1)[0] in loopback for a in addresses), addresses


def _ray_task_processes(pids: list[int], title: str) -> list[int]:
    found = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") == title:
                found.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def test_worker_killed_mid_slide_is_retried_and_the_run_succeeds(cohort, head, histoscope_cli):
    out = cohort / "killed"
    proc = subprocess.Popen(histoscope_cli("tile", str(cohort / "slides"), "--out", str(out), "--executor", "ray",
                                           "--address", head.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for pid in _ray_task_processes(head.processes(), "ray::tile_slide"):
            os.kill(pid, signal.SIGKILL)
            killed = pid
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=180)
    assert killed is not None, "no worker was seen running a slide"
    assert proc.returncode == 0, stderr.decode()[-2000:]
    records = _report(out)
    assert sorted(r["slide"] for r in records) == sorted(SLIDES)
    assert all(r["status"] == "ok" for r in records)
    assert not _partials(out)
    _assert_same_tiles(out, cohort / "local")


def test_poisoned_slide_is_retried_a_bounded_number_of_times_then_reported(cohort, head):
    attempts = cohort / "attempts.txt"

    def poisoned(job):  # a slide that crashes its worker every time (a segfault in a reader)
        if job.name == "b":
            with open(attempts, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return tile_slide(job, out_dir=str(cohort / "poisoned"), params=TileParams())

    runner = RayExecutor(address=head.address, max_retries=1)  # shares the module's connection
    result = run_batch(collect_slides([cohort / "slides"]), poisoned, out_dir=cohort / "poisoned", stage="tile",
                       executor=runner, progress=False)
    assert result.failed == ["b"]
    assert "died" in result.records["b"]["error"] and "2 attempts" in result.records["b"]["error"]
    assert len(attempts.read_text().split()) == 2  # the first try and one retry, each in a new worker
    assert result.records["a"]["status"] == result.records["c"]["status"] == "ok"
    assert sorted(r["slide"] for r in _report(cohort / "poisoned")) == sorted(SLIDES)
    assert not _partials(cohort / "poisoned")
    with h5py.File(cohort / "poisoned" / "patches" / "a_patches.h5") as f:
        assert len(f["coords"]) > 0


def test_train_folds_as_parallel_ray_tasks_and_predict_on_ray_give_the_local_results(executor, tmp_path,
                                                                                     one_torch_thread):
    from histoscope.io.columns import read_columns
    from histoscope.predict import predict_slides, predictions_path
    from histoscope.train import TrainConfig, train
    from histoscope.train.synthetic import make_mil_cohort

    cohort = make_mil_cohort(tmp_path / "mil", slides=12, tiles=(10, 20), seed=0)

    def config(out: str) -> TrainConfig:
        return TrainConfig(csv=str(cohort.csv), features_dir=str(cohort.features_dir), out_dir=str(tmp_path / out),
                           model="abmil_gated", tiny=True, folds=2, epochs=2, lr=5e-3, batch_size=1, patience=5,
                           device="cpu", precision="fp32", bootstrap=20, seed=0)

    sequential = train(config("sequential"))
    parallel = train(config("parallel"), executor=executor)
    for fold in ("0", "1"):
        expected = read_columns(tmp_path / "sequential" / f"fold_{fold}" / "predictions.csv")
        got = read_columns(tmp_path / "parallel" / f"fold_{fold}" / "predictions.csv")
        assert got.keys() == expected.keys() and got["slide_id"] == expected["slide_id"]
        for key, values in expected.items():
            try:
                np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(values, float), atol=1e-5)
            except ValueError:  # a column of names
                assert got[key] == values
    assert parallel["pooled"]["metrics"].keys() == sequential["pooled"]["metrics"].keys()
    for name, entry in sequential["pooled"]["metrics"].items():
        assert parallel["pooled"]["metrics"][name]["value"] == pytest.approx(entry["value"], abs=1e-6)

    checkpoint = tmp_path / "sequential" / "fold_0" / "checkpoint.pt"
    local = predict_slides(checkpoint, features_dir=cohort.features_dir, out_dir=tmp_path / "pred_local", device="cpu")
    on_ray = predict_slides(checkpoint, features_dir=cohort.features_dir, out_dir=tmp_path / "pred_ray", device="cpu",
                            executor=executor)
    assert local.ok and on_ray.ok and len(on_ray.records) == 12
    assert (predictions_path(tmp_path / "pred_ray").read_text() == predictions_path(tmp_path / "pred_local").read_text())
    some = next(iter(local.records))
    assert (tmp_path / "pred_ray" / some / "tile_scores.csv").read_bytes() == \
           (tmp_path / "pred_local" / some / "tile_scores.csv").read_bytes()
