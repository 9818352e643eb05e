"""Tissue segmentation scored against the known masks of sample slides, plus
known-answer tests for the geometry (tile fractions, GeoJSON, drawing, outputs)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from histoscope.io import open_slide
from histoscope.io.sample import make_sample_slide
from histoscope.io.slide import READ_CHUNK
from histoscope.tissue import (
    TissueMask,
    draw_contours,
    geojson_to_polygons,
    save_tissue_outputs,
    segment_tissue,
)

# 1.5 x 1.15 mm at 0.25 µm/px, levels 1 and 4 (8 µm/px is read from level 1). Smaller
# layouts are mostly edge at 8 µm/px, where a pixel of disagreement costs 1% of IoU.
WIDTH, HEIGHT, MPP = 6144, 4608, 0.25


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        assert abs(a.shape[0] - b.shape[0]) <= 1 and abs(a.shape[1] - b.shape[1]) <= 1, (a.shape, b.shape)
        b = cv2.resize(b.astype(np.uint8), a.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


def _holes(mask: np.ndarray) -> list[np.ndarray]:
    """(h, w) bool masks of the glass regions tissue encloses."""
    background = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    count, labels = cv2.connectedComponents(background, connectivity=4)
    outside = labels[0, 0]
    labels = labels[1:-1, 1:-1]
    return [labels == k for k in range(1, count) if k != outside]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("tissue")
    return {
        "plain": make_sample_slide(root / "plain.svs", width=WIDTH, height=HEIGHT, mpp=MPP, seed=0),
        "pen": make_sample_slide(root / "pen.tiff", width=WIDTH, height=HEIGHT, mpp=MPP, kind="tiff",
                                 pen_marks=True, seed=0),
        # The same layout (same seed, same physical size) scanned at half the resolution.
        "coarse": make_sample_slide(root / "coarse.svs", width=WIDTH // 2, height=HEIGHT // 2, mpp=2 * MPP, seed=0),
        "empty": make_sample_slide(root / "empty.svs", width=WIDTH, height=HEIGHT, mpp=MPP, empty=True),
        # The plain slide's pixels without a thumbnail (nor label, macro) page, and as level 0 alone.
        "bare": make_sample_slide(root / "bare.svs", width=WIDTH, height=HEIGHT, mpp=MPP, associated=(), seed=0),
        "flat": make_sample_slide(root / "flat.svs", width=WIDTH, height=HEIGHT, mpp=MPP, downsamples=(1,),
                                  associated=(), seed=0),
    }


@pytest.fixture(scope="module")
def plain_tissue(slides):
    with open_slide(slides["plain"].path) as slide:
        return segment_tissue(slide)


def test_matches_known_mask_and_keeps_holes(slides, plain_tissue):
    truth = slides["plain"].tissue_mask
    assert plain_tissue.mpp == pytest.approx(8.0)
    assert plain_tissue.downsample == pytest.approx(32.0)
    assert plain_tissue.level0_size == (WIDTH, HEIGHT)
    assert _iou(plain_tissue.mask, truth) >= 0.9
    true_holes = _holes(truth)
    assert true_holes, "the sample layout should have lumen-like holes"
    for hole in true_holes:  # 160-300 µm lumens stay glass
        assert (~plain_tissue.mask[hole]).mean() >= 0.8
    assert plain_tissue.area_um2 == pytest.approx(truth.sum() * 64.0, rel=0.1)


def test_pen_marks_are_removed(slides, plain_tissue):
    with open_slide(slides["pen"].path) as slide:
        tissue = segment_tissue(slide)
        kept = segment_tissue(slide, remove_pen=False)
        pen_image = slide.read_at_mpp(8.0)
    with open_slide(slides["plain"].path) as slide:
        plain_image = slide.read_at_mpp(8.0)
    # Same seed, same layout: where the two slides differ is the ink.
    ink = np.abs(pen_image.astype(int) - plain_image.astype(int)).sum(-1) > 90
    assert ink.sum() > 50
    assert _iou(tissue.mask, slides["pen"].tissue_mask) >= 0.9
    assert not tissue.mask[ink].any()
    assert kept.mask[ink].mean() > 0.5  # the pen test is not passing by accident


def test_empty_slide_gives_empty_mask_and_geojson(slides):
    with open_slide(slides["empty"].path) as slide:
        tissue = segment_tissue(slide)
    assert tissue.mask.size > 0 and not tissue.mask.any()
    assert tissue.area_um2 == 0.0
    assert tissue.contours() == []
    assert tissue.to_geojson() == {"type": "FeatureCollection", "features": []}
    assert not tissue.tissue_fraction(np.array([[0, 0], [1024, 1024]]), 512).any()


def test_mask_does_not_depend_on_scan_resolution(slides, plain_tissue):
    with open_slide(slides["coarse"].path) as slide:
        coarse = segment_tissue(slide)
    assert coarse.mpp == pytest.approx(plain_tissue.mpp)
    assert coarse.downsample == pytest.approx(16.0)
    assert _iou(plain_tissue.mask, coarse.mask) >= 0.95


def _segment_recording_reads(path):
    """The mask and every (level, x, y, width, height) the segmentation read."""
    with open_slide(path) as slide:
        reads = []
        original = slide._read_level

        def recording(level, x, y, width, height):
            reads.append((level, x, y, width, height))
            return original(level, x, y, width, height)

        slide._read_level = recording
        return segment_tissue(slide), reads, slide.levels


@pytest.mark.parametrize("name", ["plain", "bare"])
def test_reads_coarsest_level_at_least_as_fine_as_seg_mpp(slides, plain_tissue, name):
    tissue, reads, levels = _segment_recording_reads(slides[name].path)
    # Levels are 0.25 and 1 µm/px: segmenting at 8 µm/px reads level 1 only, whether
    # or not a thumbnail page sits between levels 0 and 1 in the file.
    assert [l.downsample for l in levels] == pytest.approx([1, 4])
    assert reads and {level for level, *_ in reads} == {1}
    np.testing.assert_array_equal(tissue.mask, plain_tissue.mask)


def test_single_level_slide_is_read_block_by_block(slides, plain_tissue):
    tissue, reads, levels = _segment_recording_reads(slides["flat"].path)
    assert len(levels) == 1 and len(reads) > 1
    # Level 0 is read once over, in blocks of at most READ_CHUNK x READ_CHUNK px,
    # never whole: memory is one block however large the slide.
    assert all(level == 0 and w <= READ_CHUNK and h <= READ_CHUNK for level, _, _, w, h in reads)
    covered = np.zeros((HEIGHT, WIDTH), np.uint8)
    for _, x, y, w, h in reads:
        covered[y : y + h, x : x + w] += 1
    assert (covered == 1).all()
    assert _iou(tissue.mask, slides["flat"].tissue_mask) >= 0.9
    assert _iou(tissue.mask, plain_tissue.mask) >= 0.95


def test_small_holes_filled_small_pieces_dropped(tmp_path):
    """Known answers at physical scale on a plain 8 µm/px image."""
    image = np.full((200, 200, 3), 240, np.uint8)
    pink = (200, 120, 170)
    image[20:180, 20:120] = pink  # 1.28 x 0.8 mm of tissue
    image[40:46, 40:46] = 240  # 48 µm square hole: 2,304 µm², filled
    image[100:130, 60:90] = 240  # 240 µm square hole: 57,600 µm², kept
    image[150:160, 150:160] = pink  # 80 µm speck: 6,400 µm², dropped
    image[30:80, 140:190] = pink  # 400 µm piece: 160,000 µm², kept
    path = tmp_path / "known.png"
    cv2.imwrite(str(path), image[..., ::-1])
    with open_slide(path, slide_mpp=8.0) as slide:
        mask = segment_tissue(slide).mask
    assert mask[40:46, 40:46].all()
    assert not mask[102:128, 62:88].any()
    assert not mask[145:165, 145:165].any()
    assert mask[32:78, 142:188].all()
    assert mask[25:35, 25:115].all()


def test_tissue_fraction_known_answers():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 30:70] = True  # level 0: x in [480, 1120), y in [320, 960)
    tissue = TissueMask(mask=mask, mpp=4.0, downsample=16.0, level0_size=(1600, 1590))
    coords = np.array([
        [640, 480],    # fully inside
        [0, 0],        # fully outside
        [1040, 480],   # right half on tissue
        [472, 480],    # 16-px square straddling the left edge of a mask pixel: half
        [-80, -80],    # off the slide
    ])
    sizes = [160, 160, 160, 16, 160]
    expected = [1.0, 0.0, 0.5, 0.5, 0.0]
    for xy, size, want in zip(coords, sizes, expected):
        got = tissue.tissue_fraction(xy[None], size)
        assert got.dtype == np.float32 and got.shape == (1,)
        assert got[0] == pytest.approx(want, abs=1e-6), (xy, size)
    # Everything on tissue, but the slide ends 10 px into the last mask row.
    full = TissueMask(mask=np.ones((100, 100), bool), mpp=4.0, downsample=16.0, level0_size=(1600, 1590))
    assert full.tissue_fraction(np.array([[0, 1570]]), 40)[0] == pytest.approx(0.5)


def test_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = cv2.GaussianBlur(rng.standard_normal((40, 50)), (0, 0), 3) > 0
    tissue = TissueMask(mask=mask, mpp=2.0, downsample=8.0, level0_size=(397, 318))
    level0 = np.zeros((320, 400), bool)  # the mask at level 0, cut to the slide
    level0[:318, :397] = np.kron(mask, np.ones((8, 8), bool))[:318, :397]
    coords = rng.integers(-30, 360, size=(200, 2))
    size = 37
    pad = 64  # more than any square overhangs, so every window is whole
    padded = np.pad(level0, pad)
    want = [padded[y + pad : y + pad + size, x + pad : x + pad + size].sum() / size**2 for x, y in coords]
    np.testing.assert_allclose(tissue.tissue_fraction(coords, size), want, atol=1e-5)


def test_geojson_round_trip(plain_tissue):
    collection = json.loads(json.dumps(plain_tissue.to_geojson()))
    assert collection["type"] == "FeatureCollection" and collection["features"]
    hole_rings = 0
    canvas = np.zeros(plain_tissue.mask.shape, np.uint8)
    for feature in collection["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        assert feature["geometry"]["type"] == "Polygon"
        rings = feature["geometry"]["coordinates"]
        for ring in rings:
            assert len(ring) >= 4 and ring[0] == ring[-1]
        hole_rings += len(rings) - 1
        # Level 0 back to mask pixel centres; cv2 fills holes by the even-odd rule.
        points = [np.round((np.asarray(r)[:-1] / plain_tissue.downsample - 0.5) * 16).astype(np.int32) for r in rings]
        layer = np.zeros_like(canvas)
        cv2.fillPoly(layer, points, 1, cv2.LINE_8, 4)
        canvas |= layer
    assert hole_rings > 0
    assert _iou(canvas > 0, plain_tissue.mask) >= 0.95
    polygons = geojson_to_polygons(collection)
    assert len(polygons) == len(collection["features"])
    assert sum(len(p.holes) for p in polygons) == hole_rings


def test_draw_contours_scales_to_any_thumbnail(plain_tissue):
    image = np.full((300, 400, 3), 255, np.uint8)
    drawn = draw_contours(image, plain_tissue, color=(255, 0, 0), thickness=1)
    assert drawn.shape == image.shape and (image == 255).all()
    changed = (drawn != 255).any(-1)
    # The lines follow the tissue edge: everything drawn is near the mask boundary.
    mask = cv2.resize(plain_tissue.mask.astype(np.uint8), (400, 300), interpolation=cv2.INTER_NEAREST)
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((9, 9), np.uint8)) > 0
    assert changed.sum() > 100 and changed[edge].sum() / changed.sum() > 0.95


def test_outputs_written_atomically(slides, plain_tissue, tmp_path):
    with open_slide(slides["plain"].path) as slide:
        paths = save_tissue_outputs(slide, plain_tissue, tmp_path / "out")
    assert paths["geojson"] == tmp_path / "out" / "contours_geojson" / "plain.geojson"
    assert paths["thumbnail"] == tmp_path / "out" / "thumbnails" / "plain.jpg"
    assert paths["mask"] == tmp_path / "out" / "masks" / "plain.png"
    assert json.loads(paths["geojson"].read_text()) == json.loads(json.dumps(plain_tissue.to_geojson()))
    thumb = cv2.imread(str(paths["thumbnail"]))
    assert thumb is not None and max(thumb.shape[:2]) <= 1024
    png = cv2.imread(str(paths["mask"]), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(png)) <= {0, 255}
    np.testing.assert_array_equal(png > 0, plain_tissue.mask)
    loaded = TissueMask.load_png(paths["mask"])
    np.testing.assert_array_equal(loaded.mask, plain_tissue.mask)
    assert (loaded.mpp, loaded.downsample, loaded.level0_size) == (
        plain_tissue.mpp, plain_tissue.downsample, plain_tissue.level0_size)
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p not in paths.values()]
    assert leftovers == []
