"""Slide reading: every backend and format, metadata mpp, parity with OpenSlide, errors."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from histoscope import open_slide
from histoscope.io import CorruptSlideError, MissingMppError, UnsupportedSlideError, select_backend
from histoscope.io.mpp import mpp_from_aperio, mpp_from_ome, mpp_from_resolution
from histoscope.io.sample import SVS_ASSOCIATED, make_sample_slide, split_jpeg_tables
from histoscope.tiling import TileGeometry


def _openslide_rgb(path, location, level, size):
    return np.asarray(openslide.OpenSlide(str(path)).read_region(location, level, size))[..., :3]


# ---- backend selection and metadata --------------------------------------------------

def test_svs_uses_fast_path_with_aperio_metadata(svs_slide):
    with open_slide(svs_slide.path) as slide:
        assert slide.backend == "tiff"
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.dimensions == (4096, 3072)
        assert [l.downsample for l in slide.levels] == pytest.approx([1, 4, 16])
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
        assert slide.read_associated("label").shape == (400, 400, 3)


def test_generic_tiff_mpp_from_resolution_tags(tiff_slide):
    with open_slide(tiff_slide.path) as slide:
        assert (slide.backend, slide.vendor) == ("tiff", "generic-tiff")
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        assert [l.downsample for l in slide.levels] == pytest.approx([1, 2, 4])


def test_ome_tiff_mpp_and_subifd_pyramid(ome_slide):
    with open_slide(ome_slide.path) as slide:
        assert slide.vendor == "ome"
        assert slide.name == "pyramid"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 2


def test_openslide_backend_reads_same_metadata(svs_slide, tiff_slide):
    for sample in (svs_slide, tiff_slide):
        with open_slide(sample.path, backend="openslide") as slide:
            assert slide.backend == "openslide"
            assert slide.mpp == pytest.approx(0.25, rel=1e-4)
            assert slide.dimensions == sample.dimensions


@pytest.mark.parametrize("description, expected", [
    ("Aperio Image Library v12\r\n100x100 [0,0 100x100] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990", 0.499),
    ("Aperio Image Library v12\r\n100x100|AppMag = 20", None),
    ("not aperio|MPP = 0.5", None),
])
def test_mpp_from_aperio(description, expected):
    assert mpp_from_aperio(description) == (pytest.approx(expected) if expected else None)


def test_mpp_from_ome_units():
    xml = '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="{}" PhysicalSizeXUnit="{}"/></Image></OME>'
    assert mpp_from_ome(xml.format(0.25, "µm")) == pytest.approx(0.25)
    assert mpp_from_ome(xml.format(250, "nm")) == pytest.approx(0.25)
    assert mpp_from_ome(xml.format(0.00025, "mm")) == pytest.approx(0.25)


def test_mpp_from_resolution_units():
    assert mpp_from_resolution(40000.0, 3) == pytest.approx(0.25)  # px/cm
    assert mpp_from_resolution((101600, 1), 2) == pytest.approx(0.25)  # px/inch as a rational
    assert mpp_from_resolution(40000.0, 1) is None  # no absolute unit
    assert mpp_from_resolution(72.0, 2) is None  # an editor's screen dpi, not a scan


def test_missing_mpp_names_file_and_flag(slides_dir):
    sample = make_sample_slide(slides_dir / "nompp.svs", width=1024, height=1024, mpp=None, kind="svs")
    slide = open_slide(sample.path)
    assert slide.metadata_mpp is None and not slide.has_mpp
    with pytest.raises(MissingMppError) as info:
        slide.mpp
    assert "nompp.svs" in str(info.value) and "--slide-mpp" in str(info.value)
    assert open_slide(sample.path, slide_mpp=0.25).mpp == 0.25


def test_png_roi_with_and_without_physical_size(tmp_path, svs_slide):
    region = open_slide(svs_slide.path).read_region((1000, 1000), 0, (300, 200))
    Image.fromarray(region).save(tmp_path / "roi.png", dpi=(25400 / 0.5, 25400 / 0.5))
    Image.fromarray(region).save(tmp_path / "plain.png")
    with open_slide(tmp_path / "roi.png") as roi:
        assert roi.backend == "image" and roi.vendor == "png"
        assert roi.mpp == pytest.approx(0.5, rel=1e-3)
        np.testing.assert_array_equal(roi.read_region((0, 0), 0, (300, 200)), region)
    with pytest.raises(MissingMppError):
        open_slide(tmp_path / "plain.png").mpp


def test_single_level_tiff_and_jpeg_roi(tmp_path, svs_slide):
    region = open_slide(svs_slide.path).read_region((500, 700), 0, (320, 240))
    tifffile.imwrite(tmp_path / "roi.tif", region, photometric="rgb", resolution=(25400 / 0.25, 25400 / 0.25),
                     resolutionunit="INCH")
    with open_slide(tmp_path / "roi.tif") as roi:
        assert roi.backend == "image"
        assert roi.mpp == pytest.approx(0.25, rel=1e-4)
        np.testing.assert_array_equal(roi.read_region((0, 0), 0, (320, 240)), region)
    Image.fromarray(region).save(tmp_path / "roi.jpg", quality=95)
    with open_slide(tmp_path / "roi.jpg", slide_mpp=0.25) as roi:
        assert roi.dimensions == (320, 240)
        np.testing.assert_array_equal(roi.read_region((0, 0), 0, (320, 240)),
                                      np.asarray(Image.open(tmp_path / "roi.jpg").convert("RGB")))


def test_jpeg2000_tiled_tiff_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (600, 520, 3), dtype=np.uint8), (0, 0), 3)
    tifffile.imwrite(tmp_path / "j2k.tif", image, tile=(256, 256), compression="jpeg2000",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "j2k.tif") as slide:
        assert slide.backend == "tiff" and slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (520, 600)), tifffile.imread(tmp_path / "j2k.tif"))


# ---- pyramid structure: levels and associated images as OpenSlide sees them ---------

def _assert_structure_matches_openslide(path, *, openslide_levels=None):
    """The fast path's levels and associated images (names, pixels) equal OpenSlide's;
    ``openslide_levels`` limits the level comparison to OpenSlide's first levels."""
    ours, ref = open_slide(path), open_slide(path, backend="openslide")
    assert ours.backend == "tiff"
    count = ref.level_count if openslide_levels is None else openslide_levels
    assert [(l.width, l.height) for l in ours.levels[:count]] == [(l.width, l.height) for l in ref.levels]
    assert [l.downsample for l in ours.levels[:count]] == pytest.approx([l.downsample for l in ref.levels])
    assert ours.associated_images == ref.associated_images
    for name in ref.associated_images:
        mine, theirs = ours.read_associated(name), ref.read_associated(name)
        assert mine.shape == theirs.shape, name
        assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 2, name
    return ours


def _written_levels(sample):
    width, height = sample.dimensions
    return [(width // ds, height // ds) for ds in sample.downsamples]


@pytest.mark.parametrize("downsamples", [(1, 4), (1, 4, 16)], ids=["2-levels", "3-levels"])
@pytest.mark.parametrize("associated", [SVS_ASSOCIATED, ("label", "macro"), ("thumbnail",), ()],
                         ids=["thumbnail-label-macro", "label-macro", "thumbnail", "none"])
def test_svs_levels_and_associated_images_match_openslide(tmp_path, downsamples, associated):
    sample = make_sample_slide(tmp_path / "slide.svs", width=1536, height=1024, mpp=0.25, kind="svs",
                               downsamples=downsamples, associated=associated, seed=4)
    slide = _assert_structure_matches_openslide(sample.path)
    assert [(l.width, l.height) for l in slide.levels] == _written_levels(sample)
    assert set(slide.associated_images) == set(associated)


@pytest.mark.parametrize("kind, name", [("tiff", "generic.tiff"), ("ome", "pyramid.ome.tiff")])
def test_other_sample_kinds_levels_match_openslide(tmp_path, kind, name):
    sample = make_sample_slide(tmp_path / name, width=1536, height=1024, mpp=0.5, kind=kind,
                               downsamples=(1, 2, 4), seed=5)
    # OpenSlide reads OME-TIFF as a generic TIFF and does not follow SubIFDs, so it sees
    # level 0 alone; the reduced levels are checked against what was written.
    slide = _assert_structure_matches_openslide(sample.path, openslide_levels=1 if kind == "ome" else None)
    assert [(l.width, l.height) for l in slide.levels] == _written_levels(sample)
    assert slide.associated_images == ()


def test_aperio_stripped_pages_named_by_subfile_type_as_openslide(tmp_path):
    """GT 450 layout: label and macro carry no ImageDescription, only NewSubfileType;
    a stripped page of another subfile type is no associated image, whatever its text."""
    rng = np.random.default_rng(6)
    level0 = cv2.GaussianBlur(rng.integers(0, 255, (512, 768, 3), dtype=np.uint8), (0, 0), 4)
    header = "Aperio Image Library v12.0.15\r\n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=90"
    tiled = dict(tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)
    stripped = dict(compression="lzw", photometric="rgb", metadata=None)
    with tifffile.TiffWriter(tmp_path / "gt450.svs") as tif:
        tif.write(level0, description=header + "|MPP = 0.2630", **tiled)
        tif.write(level0[::4, ::4].copy(), description=header + " -> 192x128 - ", **stripped)  # thumbnail
        tif.write(level0[::2, ::2].copy(), description=header + " -> 384x256", **tiled)
        tif.write(level0[:100, :300].copy(), subfiletype=1, **stripped)  # label
        tif.write(level0[:200, :600].copy(), subfiletype=9, **stripped)  # macro
        tif.write(level0[:50, :50].copy(), description="Aperio Image Library\r\nlabel 50x50", **stripped)
    slide = _assert_structure_matches_openslide(tmp_path / "gt450.svs")
    assert [(l.width, l.height) for l in slide.levels] == [(768, 512), (384, 256)]
    assert slide.associated_images == ("label", "macro", "thumbnail")
    assert slide.read_associated("label").shape == (100, 300, 3)


# ---- pixels: fast path against OpenSlide -------------------------------------------

@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide"])
def test_fast_path_matches_openslide_pixel_for_pixel(fixture, request):
    sample = request.getfixturevalue(fixture)
    slide = open_slide(sample.path)
    assert slide.backend == "tiff"
    rng = np.random.default_rng(0)
    for level, lvl in enumerate(slide.levels):
        ds = int(round(lvl.downsample))
        for _ in range(4):
            # Unaligned regions that straddle stored tiles, at level-0 multiples of the
            # downsample (OpenSlide resamples sub-pixel offsets, we do not).
            w, h = int(rng.integers(50, min(700, lvl.width))), int(rng.integers(50, min(500, lvl.height)))
            x, y = int(rng.integers(0, lvl.width - w)) * ds, int(rng.integers(0, lvl.height - h)) * ds
            ours = slide.read_region((x, y), level, (w, h))
            ref = _openslide_rgb(sample.path, (x, y), level, (w, h))
            diff = np.abs(ours.astype(int) - ref.astype(int))
            assert diff.max() <= 2, (level, x, y, diff.max())
            assert diff.mean() < 0.05


def test_jpeg_tables_split_keeps_image_decodable():
    import imagecodecs

    image = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8), (0, 0), 2)
    full = imagecodecs.jpeg8_encode(image, level=90)
    tables, abbreviated = split_jpeg_tables(bytes(full))
    assert b"\xff\xdb" in tables and b"\xff\xdb" not in abbreviated
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(abbreviated, tables=tables), imagecodecs.jpeg8_decode(full))


def test_out_of_bounds_reads_are_white(svs_slide):
    slide = open_slide(svs_slide.path)
    region = slide.read_region((4000, 3000), 0, (200, 200))
    assert region.shape == (200, 200, 3)
    assert (region[100:, :] == 255).all() and (region[:, 100:] == 255).all()
    np.testing.assert_array_equal(region[:72, :96], slide.read_region((4000, 3000), 0, (96, 72)))


def test_read_region_returns_writable_copy(svs_slide):
    slide = open_slide(svs_slide.path)
    first = slide.read_region((0, 0), 0, (256, 256))
    first[:] = 0
    assert slide.read_region((0, 0), 0, (256, 256)).max() > 0


# ---- tiles at a target resolution ----------------------------------------------------

def test_read_tiles_at_half_micron_from_quarter_micron_slide(svs_slide):
    slide = open_slide(svs_slide.path)
    geometry = TileGeometry.for_slide(slide, size=256, mpp=0.5)
    # Levels are 0.25 / 1.0 / 4.0 µm: the coarsest at least as fine as 0.5 is level 0.
    assert (geometry.read_level, geometry.read_size, geometry.size_level0) == (0, 512, 512)
    coords = np.array([[1024, 512], [2048, 1536], [3584, 2560]])
    tiles = slide.read_tiles(coords, size=256, mpp=0.5)
    assert tiles.shape == (3, 256, 256, 3) and tiles.dtype == np.uint8
    for tile, (x, y) in zip(tiles, coords):
        expected = cv2.resize(slide.read_region((int(x), int(y)), 0, (512, 512)), (256, 256), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(tile, expected)


def test_read_tiles_uses_level_at_target_resolution(tiff_slide):
    slide = open_slide(tiff_slide.path)
    geometry = TileGeometry.for_slide(slide, size=256, mpp=0.5)
    assert (geometry.read_level, geometry.read_size, geometry.size_level0) == (1, 256, 512)  # level 1: no resizing
    tiles = slide.read_tiles([[512, 1024]], size=256, mpp=0.5)
    np.testing.assert_array_equal(tiles[0], slide.read_region((512, 1024), 1, (256, 256)))
    # Native level-0 tiles when no mpp is given.
    np.testing.assert_array_equal(slide.read_tiles([[256, 0]], size=256)[0], slide.read_region((256, 0), 0, (256, 256)))


def test_read_at_mpp_never_reads_level0_whole(svs_slide, monkeypatch):
    slide = open_slide(svs_slide.path)
    calls = []
    original = slide._read_level
    monkeypatch.setattr(slide, "_read_level", lambda *a: calls.append(a) or original(*a))
    low = slide.read_at_mpp(2.0, chunk=256)
    assert low.shape[:2] == (384, 512)  # 4096 * 0.25 / 2 = 512
    # Levels are 0.25 / 1 / 4 µm: level 1 is read, in chunks of at most 256 x 256.
    assert len(calls) == 12 and all(c[0] == 1 for c in calls)
    assert max(c[3] * c[4] for c in calls) <= 256 * 256
    expected = cv2.resize(slide.read_region((0, 0), 1, (1024, 768)), (512, 384), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(low, expected)
    assert slide.read_at_mpp(8.0).shape[:2] == (96, 128)


def test_slides_pickle_for_worker_processes(svs_slide):
    slide = open_slide(svs_slide.path)
    before = slide.read_region((100, 100), 0, (64, 64))
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_region((100, 100), 0, (64, 64)), before)
    osl = open_slide(svs_slide.path, backend="openslide")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(osl)).read_region((100, 100), 0, (64, 64)),
                                  osl.read_region((100, 100), 0, (64, 64)))


# ---- bad input -------------------------------------------------------------------------

def test_truncated_slide_is_corrupt(tmp_path, svs_slide):
    data = svs_slide.path.read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 3])
    with pytest.raises((CorruptSlideError, UnsupportedSlideError)) as info:
        open_slide(tmp_path / "cut.svs")
    assert "cut.svs" in str(info.value)


def test_non_slide_files_are_rejected_with_their_name(tmp_path):
    (tmp_path / "notes.svs").write_text("this is not a slide\n" * 100)
    (tmp_path / "empty.tiff").write_bytes(b"")
    (tmp_path / "garbage.tiff").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(UnsupportedSlideError, match="notes.svs"):
        open_slide(tmp_path / "notes.svs")
    with pytest.raises(CorruptSlideError, match="empty.tiff"):
        open_slide(tmp_path / "empty.tiff")
    with pytest.raises((CorruptSlideError, UnsupportedSlideError), match="garbage.tiff"):
        open_slide(tmp_path / "garbage.tiff")
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        open_slide(tmp_path / "missing.svs")


def test_select_backend(svs_slide, tmp_path):
    assert select_backend(svs_slide.path) == "tiff"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert select_backend(tmp_path / "a.png") == "image"
    with pytest.raises(ValueError, match="unknown backend"):
        open_slide(svs_slide.path, backend="bioformats")


def test_aligned_tiles_decoded_in_place_equal_general_path(svs_slide, monkeypatch):
    slide = open_slide(svs_slide.path)
    coords = np.array([[0, 0], [256, 512], [3840, 2816]])  # on the stored 256-px grid
    direct = slide.read_tiles(coords, size=256)
    monkeypatch.setattr(slide, "_read_level_into", lambda *a: False)
    general = slide.read_tiles(coords, size=256)
    np.testing.assert_array_equal(direct, general)
    for tile, (x, y) in zip(direct, coords):
        np.testing.assert_array_equal(tile, _openslide_rgb(svs_slide.path, (int(x), int(y)), 0, (256, 256)))
