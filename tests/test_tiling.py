"""Tile grids at exact microns, the patches h5 format, and streaming tiles to PyTorch."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histoscope import open_slide
from histoscope.tiling import TileGeometry, read_patches, tile_grid, write_patches
from histoscope.tiling.dataset import TileSource, TileStream, tile_loader


class _RectTissue:
    """Tissue filter with known answers: tissue is the level-0 rectangle [x0, x1) x [y0, y1)."""

    def __init__(self, x0, y0, x1, y1):
        self.box = (x0, y0, x1, y1)

    def tissue_fraction(self, coords, size):
        x0, y0, x1, y1 = self.box
        w = np.clip(np.minimum(coords[:, 0] + size, x1) - np.maximum(coords[:, 0], x0), 0, None)
        h = np.clip(np.minimum(coords[:, 1] + size, y1) - np.maximum(coords[:, 1], y0), 0, None)
        return (w * h) / float(size * size)


def test_half_micron_tiles_from_quarter_micron_slide(svs_slide):
    slide = open_slide(svs_slide.path)
    grid = tile_grid(slide, _RectTissue(1024, 512, 2048, 1536), size=256, mpp=0.5, min_tissue=0.5)
    geometry = grid.geometry
    assert geometry.size == 256 and geometry.size_level0 == 512
    assert geometry.level0_mpp == pytest.approx(0.25) and geometry.mpp == 0.5
    expected = {(x, y) for x in (1024, 1536) for y in (512, 1024)}
    assert {tuple(c) for c in grid.coords.tolist()} == expected
    assert grid.coords.dtype == np.int64
    np.testing.assert_allclose(grid.tissue_fraction, 1.0)


def test_grid_threshold_overlap_and_native_slides(tiff_slide, svs_slide):
    slide = open_slide(svs_slide.path)
    # A tile half on tissue is kept at 0.5 and dropped at 0.6.
    half = _RectTissue(0, 0, 256, 4096)
    assert len(tile_grid(slide, half, size=256, mpp=0.5, min_tissue=0.5)) == 6  # 3072 / 512 rows
    assert len(tile_grid(slide, half, size=256, mpp=0.5, min_tissue=0.6)) == 0
    # Overlap of 128 px at 0.5 µm/px is a 256 level-0 px step.
    grid = tile_grid(slide, None, size=256, mpp=0.5, overlap=128)
    xs = np.unique(grid.coords[:, 0])
    assert xs[:3].tolist() == [0, 256, 512] and grid.overlap == 128
    # A 0.5 µm/px slide tiled at 0.5 µm/px: one level-0 px per target px.
    native = open_slide(svs_slide.path, slide_mpp=0.5)
    assert tile_grid(native, None, size=256, mpp=0.5).geometry.size_level0 == 256
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(slide, None, size=256, mpp=0.5, overlap=256)


def test_patches_h5_matches_trident_and_clam_layout(tmp_path, svs_slide):
    slide = open_slide(svs_slide.path)
    grid = tile_grid(slide, _RectTissue(0, 0, 2048, 2048), size=256, mpp=0.5)
    path = write_patches(tmp_path / "patches" / "aperio_patches.h5", grid, slide_name="aperio")
    with h5py.File(path) as f:
        coords = f["coords"]
        assert coords.dtype == np.int64 and coords.shape == (len(grid), 2)
        attrs = dict(coords.attrs)
        assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512
        assert attrs["level0_width"] == 4096 and attrs["level0_height"] == 3072
        assert attrs["target_mpp"] == 0.5 and attrs["level0_mpp"] == pytest.approx(0.25)
        # TRIDENT derives the level-0 patch size from magnifications; CLAM reads patch_level/patch_size.
        assert attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"] == pytest.approx(512)
        assert attrs["patch_level"] == 0
        assert f["tissue_fraction"].shape == (len(grid),)
    coords, meta = read_patches(path)
    np.testing.assert_array_equal(coords, grid.coords)
    assert meta["name"] == "aperio"
    assert not list((tmp_path / "patches").glob(".*"))  # no temporary files left


def test_tile_geometry_round_trips_through_each_file_layout(tmp_path, svs_slide):
    slide = open_slide(svs_slide.path)
    grid = tile_grid(slide, _RectTissue(0, 0, 2048, 2048), size=256, mpp=0.5)
    _, attrs = read_patches(write_patches(tmp_path / "s_patches.h5", grid, slide_name="s"))
    assert TileGeometry.from_attrs(attrs) == grid.geometry
    # TRIDENT stores no resolutions: the slide's level-0 mpp gives the target one.
    trident = {"patch_size": 256, "patch_size_level0": 512}
    assert TileGeometry.from_attrs(trident).mpp is None
    assert TileGeometry.from_attrs(trident, level0_mpp=0.25).mpp == 0.5
    # CLAM: patch_size px at a level whose downsample it stores.
    clam = TileGeometry.from_attrs({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])},
                                   level0_mpp=0.25)
    assert (clam.size, clam.size_level0, clam.mpp) == (256, 1024, 1.0)
    # Resolutions without the level-0 size: derived from them.
    assert TileGeometry.from_attrs({"patch_size": 224, "target_mpp": 0.5, "level0_mpp": 0.25}).size_level0 == 448
    with pytest.raises(ValueError, match="patch_size_level0"):
        TileGeometry.from_attrs({"patch_size": 256, "target_mpp": 0.5})


def test_tile_stream_yields_every_tile_once_across_workers(svs_slide, tiff_slide):
    sources = [
        TileSource(str(svs_slide.path), np.array([[x, y] for x in range(0, 2048, 512) for y in (0, 512)]), 64, 0.5),
        TileSource(str(tiff_slide.path), np.array([[0, 0], [512, 512], [1024, 0]]), 64, 0.5),
        TileSource("/nonexistent/slide.svs", np.zeros((5, 2), np.int64), 64, 0.5),
    ]
    seen = {0: {}, 1: {}}
    errors = []
    for item in tile_loader(sources, chunk_size=3, num_workers=2):
        if "error" in item:
            errors.append((item["source"], item["error"]))
            continue
        for row, index in enumerate(item["index"].tolist()):
            assert index not in seen[item["source"]]
            seen[item["source"]][index] = item["tiles"][row].numpy()
    assert sorted(seen[0]) == list(range(8)) and sorted(seen[1]) == [0, 1, 2]
    # Each worker holding a chunk of the bad slide reports it; the consumer sees the source.
    assert {e[0] for e in errors} == {2} and all("slide.svs" in e[1] for e in errors)
    reference = open_slide(svs_slide.path).read_tiles(sources[0].coords, size=64, mpp=0.5)
    for index, tile in seen[0].items():
        np.testing.assert_array_equal(tile, reference[index])


def test_tile_stream_in_process_with_transform(svs_slide):
    import torch

    source = TileSource(str(svs_slide.path), np.array([[0, 0], [512, 0]]), 32, 0.5)
    stream = TileStream([source], chunk_size=8, transform=lambda t: torch.from_numpy(t).permute(0, 3, 1, 2).float() / 255)
    (item,) = list(stream)
    assert item["tiles"].shape == (2, 3, 32, 32) and item["tiles"].dtype == torch.float32
