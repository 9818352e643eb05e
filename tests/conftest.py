"""Shared fixtures: small realistic slides written once per test session."""

from __future__ import annotations

import pytest
import torch

from histoscope.io.sample import make_sample_slide


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 cores: OpenMP hand-offs between threads cost more than the maths."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
