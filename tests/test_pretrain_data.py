"""Streamed pretraining data: order, sharding over ranks and workers, augmentation determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoscope.io.sample import sample_texture
from histoscope.pretrain.augment import MultiCropAugment, hed_jitter, random_resized_crop_box
from histoscope.pretrain.data import ImageFiles, SlideTiles, StepStream, TileIndex, sample_order, step_loader


def test_sample_order_is_a_seeded_permutation_mixing_slides():
    sizes = np.array([100, 50, 0, 70])
    order = sample_order(sizes, chunk=8, buffer=32, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(220))
    assert np.array_equal(order, sample_order(sizes, chunk=8, buffer=32, seed=3, epoch=0))
    assert not np.array_equal(order, sample_order(sizes, chunk=8, buffer=32, seed=3, epoch=1))
    slide = np.searchsorted(np.cumsum(sizes), order, side="right")
    assert len(set(slide[:32].tolist())) >= 2  # a batch draws from several slides


def _collate(tiles, *, positions, step, rank, world_size, seed):
    return {"value": torch.tensor([int(t[0, 0, 0]) for t in tiles]), "positions": torch.from_numpy(positions)}


def _images(tmp_path, n):
    from PIL import Image

    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i:03d}.png")
    return TileIndex(ImageFiles(tuple(str(tmp_path / f"{i:03d}.png") for i in range(n))))


def test_ranks_and_workers_split_the_same_global_batches(tmp_path):
    index = _images(tmp_path, 20)
    kwargs = dict(collate=_collate, global_batch=8, seed=1, start_step=0, stop_step=6, chunk=4, buffer=8)
    single = [b["value"] for b in StepStream(index, rank=0, world_size=1, **kwargs)]
    ranks = [[b["value"] for b in StepStream(index, rank=r, world_size=2, **kwargs)] for r in range(2)]
    for step in range(6):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])
    workers = list(step_loader(StepStream(index, rank=0, world_size=1, **kwargs), workers=2))
    assert [b["step"] for b in workers] == list(range(6))
    assert all(torch.equal(a, b["value"]) for a, b in zip(single, workers))
    resumed = [b["value"] for b in StepStream(index, rank=0, world_size=1, **{**kwargs, "start_step": 4})]
    assert all(torch.equal(a, b) for a, b in zip(single[4:], resumed))
    seen = torch.cat(single[:2]).tolist() + single[2][:4].tolist()  # the first pass: 20 samples
    assert sorted(seen) == list(range(20))


def test_unreadable_slide_is_replaced_and_reported(tmp_path, svs_slide):
    good = SlideTiles(name="good", path=str(svs_slide.path), coords=np.array([[0, 0], [512, 512]]), size=32, mpp=2.0)
    bad = SlideTiles(name="bad", path=str(tmp_path / "missing.svs"), coords=np.array([[0, 0]] * 6), size=32,
                     mpp=2.0)
    stream = StepStream(TileIndex([good, bad]), collate=_collate, global_batch=8, rank=0, world_size=1, seed=0,
                        start_step=0, stop_step=1, chunk=2, buffer=2)
    batch = next(iter(stream))
    assert batch["read_errors"] and "missing.svs" in batch["read_errors"][0]
    assert len(batch["value"]) == 8


def test_augmentation_is_a_function_of_the_seed():
    tile = sample_texture("he")[:256, :256]
    augment = MultiCropAugment(global_size=64, local_size=32, local_number=3)
    g1, l1 = augment(tile, np.random.default_rng([0, 5]))
    g2, l2 = augment(tile, np.random.default_rng([0, 5]))
    g3, _ = augment(tile, np.random.default_rng([0, 6]))
    assert g1.shape == (2, 64, 64, 3) and l1.shape == (3, 32, 32, 3) and g1.dtype == np.uint8
    assert np.array_equal(g1, g2) and np.array_equal(l1, l2) and not np.array_equal(g1, g3)


def test_crop_box_follows_torchvision_bounds_and_hed_identity():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(rng, 100, 60, (0.05, 0.3))
        assert 0 <= top <= 100 - h and 0 <= left <= 60 - w
        assert 0.05 * 6000 * 0.7 <= h * w <= 0.3 * 6000 * 1.3
    tile = sample_texture("he")[:64, :64]
    assert np.array_equal(hed_jitter(tile, np.ones(3), np.zeros(3)), tile)
    from skimage.color import hed2rgb, rgb2hed

    shifted = hed_jitter(tile, np.array([1.1, 1.0, 1.0]), np.zeros(3))
    hed = rgb2hed(tile)
    hed[..., 0] *= 1.1
    expected = (hed2rgb(hed) * 255).round()  # skimage's deconvolution (its clipping of negatives aside)
    assert np.abs(shifted.astype(float) - expected).mean() < 3.0
