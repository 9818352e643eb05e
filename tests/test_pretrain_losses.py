"""DINOv2's losses, schedules, masks and parameter groups against references written here
from the definitions in dinov2/loss/, dinov2/train/, dinov2/data/ and dinov2/utils/."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import histoscope
from histoscope.pretrain import DINOLoss, KoLeoLoss, iBOTPatchLoss
from histoscope.pretrain.masking import BlockMaskGenerator, draw_masks
from histoscope.pretrain.optim import param_groups
from histoscope.pretrain.schedules import cosine_schedule

K = 16


def _log_softmax64(x, temp):
    z = x.double() / temp
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _softmax64(x, temp):
    return torch.exp(_log_softmax64(x, temp))


def _sinkhorn_ref(t, temp, n_iter=3):
    """The algorithm as written in the reference, in float64 numpy, one process."""
    q = np.exp(t.double().numpy() / temp).T  # (K, B)
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_dino_loss_sums_cross_entropies_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(5, K, generator=g) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(5, K, generator=g), -1) for _ in range(2)]
    expected = sum(-(t.double() * _log_softmax64(s, 0.1)).sum(-1).mean() for s in students for t in teachers)
    got = DINOLoss(K)(students, teachers)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


def test_dino_centre_update_takes_effect_one_step_later():
    loss = DINOLoss(K, center_momentum=0.9)
    g = torch.Generator().manual_seed(1)
    centre = torch.zeros(1, K, dtype=torch.float64)
    pending = None
    for step, temp in enumerate([0.04, 0.05, 0.07, 0.07]):
        t = torch.randn(6, K, generator=g) * 3
        if pending is not None:  # the previous step's update is applied by this step's softmax_center_teacher
            centre = centre * 0.9 + pending * 0.1
        expected = _softmax64(t.double() - centre, temp)
        got = loss.softmax_center_teacher(t, teacher_temp=temp)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
        before = loss.center.clone()
        loss.update_center(t)
        assert torch.equal(loss.center, before), "update_center must not change the centre until the next step"
        pending = t.double().mean(0, keepdim=True)
        torch.testing.assert_close(loss.center.double(), centre, rtol=1e-6, atol=1e-7)


def test_dino_sinkhorn_matches_reference_and_balances():
    t = torch.randn(12, K, generator=torch.Generator().manual_seed(2)) * 2
    got = DINOLoss(K).sinkhorn_knopp_teacher(t, teacher_temp=0.07, n_iterations=3)
    np.testing.assert_allclose(got.double().numpy(), _sinkhorn_ref(t, 0.07), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1).numpy(), np.ones(12), rtol=1e-5)  # an assignment per sample


def test_ibot_dense_and_gathered_forms_agree_with_the_definition():
    g = torch.Generator().manual_seed(3)
    b, n = 4, 9
    s = torch.randn(b, n, K, generator=g)
    t = torch.softmax(torch.randn(b, n, K, generator=g), -1)
    masks = torch.rand(b, n, generator=g) < 0.4
    masks[2] = False  # an image without masked tokens still counts in the mean over images
    ce = -(t.double() * _log_softmax64(s, 0.1)).sum(-1)  # (b, n)
    per_image = [(ce[i][masks[i]].sum() / max(int(masks[i].sum()), 1)) for i in range(b)]
    expected = float(torch.stack(per_image).mean())
    loss = iBOTPatchLoss(K)
    assert float(loss(s, t, masks)) == pytest.approx(expected, rel=1e-6)
    gathered = loss.forward_masked(s[masks], t[masks], masks)
    assert float(gathered) == pytest.approx(expected, rel=1e-6)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    m = int(masks.sum())
    padded_s = torch.cat([s[masks], torch.randn(3, K, generator=g)])  # DINOv2's upper-bound buffer
    padded_t = torch.cat([t[masks], torch.softmax(torch.randn(3, K, generator=g), -1)])
    assert float(loss.forward_masked(padded_s, padded_t, masks, n_masked_patches=m, masks_weight=weight)) == \
        pytest.approx(expected, rel=1e-6)


def test_ibot_centre_is_the_mean_over_masked_tokens_applied_one_step_later():
    loss = iBOTPatchLoss(K, center_momentum=0.9)
    g = torch.Generator().manual_seed(4)
    centre = torch.zeros(1, 1, K, dtype=torch.float64)
    for step in range(3):
        t = torch.randn(1, 7 + step, K, generator=g)  # (1, M, K) as ssl_meta_arch passes it
        got = loss.softmax_center_teacher(t, teacher_temp=0.07)
        torch.testing.assert_close(got.double(), _softmax64(t.double() - centre, 0.07), rtol=1e-5, atol=1e-7)
        loss.update_center(t)
        centre = centre * 0.9 + t.double().mean(1, keepdim=True) * 0.1
    loss.apply_center_update()
    torch.testing.assert_close(loss.center.double(), centre, rtol=1e-6, atol=1e-7)
    rows = torch.randn(3, 5, K, generator=g)  # (T, N, K): mean over N, then over T
    fresh = iBOTPatchLoss(K, center_momentum=0.0)
    fresh.update_center(rows)
    fresh.apply_center_update()
    torch.testing.assert_close(fresh.center.double(), rows.double().mean(1).mean(0).view(1, 1, K), rtol=1e-6,
                               atol=1e-7)


def test_ibot_sinkhorn_uses_the_masked_count_and_leaves_it_alone():
    t = torch.randn(10, K, generator=torch.Generator().manual_seed(5))
    count = torch.tensor([10])
    got = iBOTPatchLoss(K).sinkhorn_knopp_teacher(t, teacher_temp=0.05, n_masked_patches_tensor=count)
    np.testing.assert_allclose(got.double().numpy(), _sinkhorn_ref(t, 0.05), rtol=2e-5, atol=1e-7)
    assert count.item() == 10


def test_koleo_known_answer_and_reference():
    x = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]])  # normalised: angles 0, 90, 180 degrees
    assert float(KoLeoLoss()(x)) == pytest.approx(-0.5 * math.log(2), abs=1e-6)  # every NN at distance sqrt 2
    y = torch.randn(20, 8, generator=torch.Generator().manual_seed(6))
    z = torch.nn.functional.normalize(y.double(), dim=-1)
    dots = z @ z.T
    dots.fill_diagonal_(-1)
    nn_index = dots.argmax(1)
    distance = (z - z[nn_index] + 1e-8).norm(dim=-1)
    expected = -torch.log(distance + 1e-8).mean()
    assert float(KoLeoLoss()(y)) == pytest.approx(float(expected), rel=1e-5)


def test_pending_centre_update_survives_a_checkpoint():
    loss = DINOLoss(K)
    t = torch.randn(4, K)
    loss.update_center(t)
    restored = DINOLoss(K)
    restored.load_state_dict(loss.state_dict())
    x = torch.randn(3, K)
    torch.testing.assert_close(restored.softmax_center_teacher(x, 0.07), loss.softmax_center_teacher(x, 0.07))
    torch.testing.assert_close(restored.center, loss.center)


def _distributed_worker(rank, world, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(7)
    full = torch.randn(8, K, generator=g) * 2
    part = full.chunk(world)[rank]
    dino = DINOLoss(K, center_momentum=0.5)
    dino.update_center(part)
    dino.apply_center_update()
    sinkhorn = dino.sinkhorn_knopp_teacher(part, teacher_temp=0.07)
    masked = torch.randn(6, K, generator=g)
    mine = masked[:2] if rank == 0 else masked[2:]  # unequal masked counts per rank
    ibot = iBOTPatchLoss(K, center_momentum=0.0)
    ibot.update_center(mine.unsqueeze(0))
    ibot.apply_center_update()
    ibot_sinkhorn = ibot.sinkhorn_knopp_teacher(mine, 0.07, torch.tensor([len(mine)]))
    queue.put((rank, *(x.numpy().copy() for x in (dino.center, sinkhorn, ibot.center, ibot_sinkhorn))))  # plain pickles
    dist.destroy_process_group()


def test_losses_all_reduce_under_ddp_as_the_reference():
    world, port = 2, 29000 + random.randint(0, 999)
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_distributed_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {item[0]: [torch.from_numpy(x) for x in item[1:]] for item in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    g = torch.Generator().manual_seed(7)
    full = torch.randn(8, K, generator=g) * 2
    masked = torch.randn(6, K, generator=g)
    for rank in range(world):
        centre, sinkhorn, ibot_centre, ibot_sinkhorn = results[rank]
        torch.testing.assert_close(centre, 0.5 * full.mean(0, keepdim=True))  # the global batch mean
        expected = _sinkhorn_ref(full, 0.07)  # one process over the whole batch
        rows = slice(0, 4) if rank == 0 else slice(4, 8)
        np.testing.assert_allclose(sinkhorn.double().numpy(), expected[rows], rtol=2e-5, atol=1e-7)
        # iBOT's centre averages the per-rank means of masked tokens (DINOv2's len(...) == 1 per rank)
        means = (masked[:2].mean(0) + masked[2:].mean(0)) / 2
        torch.testing.assert_close(ibot_centre.view(-1), means)
        rows = slice(0, 2) if rank == 0 else slice(2, 6)
        np.testing.assert_allclose(ibot_sinkhorn.double().numpy(), _sinkhorn_ref(masked, 0.07)[rows], rtol=2e-5,
                                   atol=1e-7)


def test_cosine_schedule_is_dinov2s():
    s = cosine_schedule(base_value=1.0, final_value=0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.0,
                        freeze_iters=2)
    iters = np.arange(13)
    expected = np.concatenate([np.zeros(2), np.linspace(0, 1, 5), 0.1 + 0.45 * (1 + np.cos(np.pi * iters / 13))])
    np.testing.assert_allclose(s.values, expected)
    assert s[19] == expected[19] and s[25] == 0.1
    temp = cosine_schedule(base_value=0.07, final_value=0.07, total_iters=4, warmup_iters=4, start_warmup_value=0.04)
    assert [temp[i] for i in range(6)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


class _PyRandom:
    """Python's random as the generator interface of histoscope.pretrain.masking."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def random(self):
        return self.r.random()

    def integers(self, lo, hi):
        return self.r.randint(lo, hi - 1)

    def permutation(self, n):
        order = list(range(n))
        self.r.shuffle(order)
        return np.array(order)


def _reference_masks(seed, n_images, grid, ratio, probability):
    """dinov2/data/masking.py + collate.py, with Python's random as they use it."""
    r = random.Random(seed)
    min_p, max_p = 4, 0.5 * (grid * 16) // 16 * (grid * 16) // 16
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def block(mask, max_mask):
        delta = 0
        for _ in range(10):
            area = r.uniform(min_p, max_mask)
            aspect = math.exp(r.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = r.randint(0, grid - h), r.randint(0, grid - w)
                if 0 < h * w - mask[top:top + h, left:left + w].sum() <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def generate(n):
        mask = np.zeros((grid, grid), dtype=bool)
        count = 0
        while count < n:
            delta = block(mask, min(n - count, max_p))
            if delta == 0:
                break
            count += delta
        return mask

    n_masked = int(n_images * probability)
    probs = torch.linspace(*ratio, n_masked + 1)
    masks = [torch.BoolTensor(generate(int(grid * grid * r.uniform(probs[i], probs[i + 1]))))
             for i in range(n_masked)]
    masks += [torch.BoolTensor(generate(0)) for _ in range(n_masked, n_images)]
    r.shuffle(masks)
    return torch.stack(masks).flatten(1)


def test_block_masks_match_the_reference_draw_for_draw():
    generator = BlockMaskGenerator.for_crops(crop_size=224, patch_size=16)
    for seed in range(3):
        ours = draw_masks(_PyRandom(seed), generator, n_images=16, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5)
        assert torch.equal(ours, _reference_masks(seed, 16, 14, (0.1, 0.5), 0.5))
    counts = ours.sum(1)
    assert (counts == 0).sum() == 8 and counts.max() <= 0.5 * 196 + 1


def test_layerwise_decay_groups():
    import timm

    from histoscope.pretrain.backbone import MaskedViT

    vit = MaskedViT(model=timm.create_model("vit_small_patch16_224", depth=3, embed_dim=32, num_heads=2,
                                            num_classes=0, reg_tokens=2, init_values=1e-5))
    groups = param_groups(vit, n_blocks=3, lr_decay_rate=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())

    def group(name):
        return by_param[id(named[name])]

    assert group("model.blocks.0.attn.qkv.weight")["lr_multiplier"] == 0.5 ** 3  # block i: decay ** (n - i)
    assert group("model.blocks.2.mlp.fc1.weight")["lr_multiplier"] == 0.5
    for name in ("model.pos_embed", "model.cls_token", "model.reg_token", "mask_token"):
        assert group(name)["lr_multiplier"] == 0.5 ** 4
    assert group("model.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.5 ** 4 * 0.2)
    assert group("model.norm.weight")["lr_multiplier"] == 1.0
    assert group("model.blocks.1.attn.qkv.bias")["wd_multiplier"] == 0.0
    assert group("model.blocks.1.ls1.gamma")["wd_multiplier"] == 0.0
    assert group("model.blocks.1.norm1.weight")["wd_multiplier"] == 0.0
    assert group("model.blocks.1.attn.qkv.weight")["wd_multiplier"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_dinov2_sums_and_scales_the_terms_as_ssl_meta_arch(centering, tmp_path):
    from pathlib import Path

    from histoscope.pretrain import get_objective, load_pretrain_recipe
    from histoscope.pretrain.objective import RunInfo

    tiny = Path(histoscope.__file__).parent / "pretrain" / "recipes" / "dinov2_tiny.yaml"
    recipe = load_pretrain_recipe("dinov2", tiny, [f"data.images={tmp_path}", "student.drop_path_rate=0",
                                                   f"centering={centering}", "optim.batch_size=4",
                                                   # no LayerScale, so that KoLeo's distances are not at float32's
                                                   # resolution (a LayerScale-1e-5 ViT maps all tiles alike)
                                                   "arch.init_values=null"])
    info = RunInfo(total_iters=20, epoch_length=5, global_batch=4, device=torch.device("cpu"), seed=0)
    objective = get_objective("dinov2").build(recipe.config, recipe.common, info)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(4)]
    batch = objective.collate()(tiles, positions=np.arange(4), step=0, rank=0, world_size=1, seed=0)
    masks, index = batch["masks"], batch["mask_indices"]
    assert masks.any()

    with torch.no_grad():  # the reference's forward_backward, term by term, in float64
        g, loc = objective.normalize(batch["global_crops"]), objective.normalize(batch["local_crops"])
        t = objective.teacher.backbone(g)
        a, b = t["cls"].chunk(2)
        t_cls = objective.teacher.dino_head(torch.cat([b, a])).double()
        t_masked = objective.teacher.ibot_head(t["patch"].flatten(0, 1)[index]).double()
        s = objective.student.backbone(g, masks)
        s_global = objective.student.dino_head(s["cls"])
        s_local = objective.student.dino_head(objective.student.backbone(loc)["cls"])
        s_masked = objective.student.ibot_head(s["patch"].flatten(0, 1)[index])
        temp = 0.04  # warm-up start of the teacher temperature
        if centering == "centering":  # the centres are still zero at the first step
            targets, ibot_targets = _softmax64(t_cls, temp), _softmax64(t_masked, temp)
        else:
            targets = torch.from_numpy(_sinkhorn_ref(t_cls, temp))
            ibot_targets = torch.from_numpy(_sinkhorn_ref(t_masked, temp))
        targets = targets.view(2, 4, -1)
        terms = 2 + 2 * 2  # n_global_crops_loss_terms + n_local_crops_loss_terms

        def ce(teacher, student):
            return -(teacher * _log_softmax64(student, 0.1)).sum(-1)

        local = sum(ce(targets[j], crop).mean() for crop in s_local.chunk(2) for j in range(2)) / terms
        glob = ce(targets.flatten(0, 1), s_global).mean() * 2 / terms
        z = torch.nn.functional.normalize(s["cls"].double(), dim=-1)
        koleo = 0
        for part in z.chunk(2):
            dots = part @ part.T
            dots.fill_diagonal_(-1)
            koleo = koleo - torch.log((part - part[dots.argmax(1)] + 1e-8).norm(dim=-1) + 1e-8).mean()
        koleo = 0.1 * koleo
        weight = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks].double()
        ibot = (ce(ibot_targets, s_masked) * weight).sum() / len(masks) * 2 * 0.5

    out = {k: v.detach() for k, v in objective(batch, step=0).items()}
    assert float(out["dino_local_crops_loss"]) == pytest.approx(float(local), rel=1e-5)
    assert float(out["dino_global_crops_loss"]) == pytest.approx(float(glob), rel=1e-5)
    assert float(out["koleo_loss"]) == pytest.approx(float(koleo) / 2, rel=1e-5)  # displayed halved
    assert float(out["ibot_loss"]) == pytest.approx(float(ibot) / 2, rel=1e-5)  # displayed halved
    assert float(out["loss"]) == pytest.approx(float(local + glob + koleo + ibot), rel=1e-5)
