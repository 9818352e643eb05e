"""Shared fixtures: small realistic slides written once per test session, one torch thread for tiny models."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest
import torch

from histoscope.io.sample import make_sample_slide


def _run_until_line(cmd: list[str], predicate, *, timeout: float = 300) -> tuple[subprocess.Popen, str | None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fd, pending = proc.stderr.fileno(), b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the process closed stderr: it has ended
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if predicate(line.decode(errors="replace")):
                return proc, line.decode(errors="replace")
    return proc, None


@pytest.fixture
def run_until_line():
    """``run_until_line(cmd, predicate)``: start ``cmd`` and block on its stderr pipe until a
    line satisfies ``predicate`` (the CLI prints one line per finished slide when stderr is
    not a terminal). Returns the still-running process and that line, or None as the line
    if the process ended (or 300 s passed) first."""
    return _run_until_line


def histoscope_command(*args: str) -> list[str]:
    """The ``histoscope`` CLI of this checkout (PYTHONPATH carries over to the child)."""
    return [sys.executable, "-m", "histoscope.cli.main", *args]


@pytest.fixture
def histoscope_cli():
    """``histoscope_cli(*args)``: the command line running the ``histoscope`` CLI in a new process."""
    return histoscope_command


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 cores: OpenMP hand-offs between threads cost more than the maths."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _embed_trained(slides, patches, out, *, encoder: str, weights, arch: dict):
    import shutil

    from typer.testing import CliRunner

    from histoscope.cli.main import app

    shutil.copytree(patches, out / "patches")
    args = ["embed", str(slides), "--out", str(out), "--encoder", encoder, "--weights", str(weights),
            "--devices", "cpu", "--dtype", "fp32", "--workers", "0"]
    args += [a for k, v in arch.items() for a in ("--arch", f"{k}={'null' if v is None else v}")]
    return CliRunner().invoke(app, args)


@pytest.fixture
def embed_trained():
    """``embed_trained(slides, patches_dir, out, encoder=, weights=, arch=)``: `histoscope embed` of the
    slides at the tiles of ``patches_dir`` with pretrained weights and architecture overrides (CLI result)."""
    return _embed_trained


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def svs_slide(slides_dir):
    """Aperio-style SVS, 4096x3072 at 0.25 µm/px, levels 1/4/16, RGB JPEG with JPEGTables."""
    return make_sample_slide(slides_dir / "aperio.svs", width=4096, height=3072, mpp=0.25, kind="svs",
                             downsamples=(1, 4, 16), seed=1)


@pytest.fixture(scope="session")
def tiff_slide(slides_dir):
    """Generic pyramidal TIFF, YCbCr JPEG, resolution tags in px/cm, levels 1/2/4."""
    return make_sample_slide(slides_dir / "generic.tiff", width=4096, height=3072, mpp=0.25, kind="tiff",
                             downsamples=(1, 2, 4), seed=2)


@pytest.fixture(scope="session")
def ome_slide(slides_dir):
    return make_sample_slide(slides_dir / "pyramid.ome.tiff", width=2048, height=1536, mpp=0.5, kind="ome",
                             downsamples=(1, 2), seed=3)
