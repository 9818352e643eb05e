"""Slide-model registry: lookup errors, strict loading, encoder checkpoints with a new head."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

from histoscope.io.checkpoint import CheckpointError
from histoscope.slide import SlideWeightsError, get_slide_model_spec, list_slide_models, load_slide_model
from histoscope.slide.base import masked_softmax


def test_unknown_name_suggests_close_ones():
    with pytest.raises(KeyError, match="abmil"):
        load_slide_model("abmill", in_dim=8)
    assert {"abmil", "gigapath_slide", "hipt", "transmil", "perceiver", "clam_sb"} <= set(list_slide_models())


@pytest.mark.parametrize("name", list_slide_models())
def test_the_spec_holds_every_default(name):
    """A builder's keywords have no defaults of their own: the spec's are the published model,
    written once, and every keyword has one (so a checkpoint's ``arch`` is complete)."""
    spec = get_slide_model_spec(name)
    parameters = inspect.signature(spec.builder).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
               for p in parameters.values())
    assert set(parameters) - {"in_dim", "num_outputs"} == set(spec.defaults)
    assert set(spec.tiny) <= set(spec.defaults)


def test_encoder_checkpoint_needs_new_head_to_gain_one(tmp_path):
    torch.manual_seed(0)
    encoder = load_slide_model("gigapath_slide", in_dim=16, num_outputs=0, tiny=True)
    torch.save({"model": encoder.state_dict()}, tmp_path / "slide_encoder.pth")  # the published layout
    with pytest.raises(SlideWeightsError, match="new_head=True"):
        load_slide_model("gigapath_slide", in_dim=16, num_outputs=2, tiny=True, weights=tmp_path / "slide_encoder.pth")
    model = load_slide_model("gigapath_slide", in_dim=16, num_outputs=2, tiny=True, new_head=True,
                             weights=tmp_path / "slide_encoder.pth")
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # Only the head may be missing: a wrong encoder still fails with new_head.
    other = load_slide_model("gigapath_slide", in_dim=16, num_outputs=0, tiny=True, depth=1)
    torch.save({"model": other.state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(SlideWeightsError, match="missing"):
        load_slide_model("gigapath_slide", in_dim=16, num_outputs=2, tiny=True, new_head=True,
                         weights=tmp_path / "shallow.pth")


def test_checkpoints_with_pickled_arguments_are_readable(tmp_path):
    model = load_slide_model("gigapath_slide", in_dim=8, num_outputs=0, tiny=True)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "train.pth")
    loaded = load_slide_model("gigapath_slide", in_dim=8, num_outputs=0, tiny=True, weights=tmp_path / "train.pth")
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_truncated_checkpoint_names_the_file(tmp_path):
    model = load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or damaged"):
        load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True, weights=tmp_path / "cut.pt")


def test_masked_softmax_keeps_float64_and_zeroes_padding():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    weights = masked_softmax(scores, mask)
    expected = torch.softmax(scores[:, :3], dim=-1)
    assert weights.dtype == torch.float64 and weights[0, 3] == 0
    torch.testing.assert_close(weights[:, :3], expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- fine-tuning with a new head

IN_DIM = 16
# (outputs of the trained checkpoint, outputs of the model it initialises); CLAM-MB has one
# attention branch per class, so it has no encoder-only form.
_HEAD_CHANGES = [(3, 2), (3, 0), (0, 2)]
_NEW_HEAD_CASES = [(name, before, after) for name in list_slide_models() for before, after in _HEAD_CHANGES
                   if name != "clam_mb" or 0 not in (before, after)]


def _slides(seed: int = 0):
    """Two slides of 24 and 9 tiles on a 256-px level-0 grid, the second padded with garbage."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 24, IN_DIM, generator=gen)
    index = torch.arange(24)
    coords = torch.stack([index % 6, index // 6], dim=-1).expand(2, -1, -1) * 256 + 30 * 256
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 9:] = False
    features[1, 9:] = 1e3
    return features, coords.float(), mask


@pytest.mark.parametrize("name,before,after", _NEW_HEAD_CASES)
def test_new_head_keeps_the_encoder_and_initialises_a_fresh_head(name, before, after, tmp_path):
    spec = get_slide_model_spec(name)
    torch.manual_seed(0)
    trained = load_slide_model(name, in_dim=IN_DIM, num_outputs=before, tiny=True).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"histoscope_model": name, "state_dict": trained.state_dict()}, path)  # histoscope train's layout
    if before and after:
        with pytest.raises(SlideWeightsError, match="new_head=True"):  # not torch's size-mismatch error
            load_slide_model(name, in_dim=IN_DIM, num_outputs=after, tiny=True, weights=path)

    torch.manual_seed(1)
    model = load_slide_model(name, in_dim=IN_DIM, num_outputs=after, tiny=True, weights=path, new_head=True).eval()
    torch.manual_seed(1)
    fresh = load_slide_model(name, in_dim=IN_DIM, num_outputs=after, tiny=True).eval()

    state, source, initial = model.state_dict(), trained.state_dict(), fresh.state_dict()
    head = [key for key in state if spec.is_head(key)]
    assert bool(head) == (after > 0) and model.num_outputs == after
    for key in state:
        expected = initial[key] if spec.is_head(key) else source[key]
        assert torch.equal(state[key], expected), key
    encoder = [key for key in state if not spec.is_head(key)]  # none in the pooling baselines
    assert not encoder or any(not torch.equal(state[key], initial[key]) for key in encoder)  # loaded, not seeded

    features, coords, mask = _slides()
    with torch.no_grad():
        out, reference = model(features, coords, mask), trained(features, coords, mask)
    if after:
        assert out.logits.shape == (2, after)
    if name == "clam_mb":  # its embedding pools with the per-class attention rows, which are head
        torch.testing.assert_close(out.extras["tile_features"], reference.extras["tile_features"], rtol=0, atol=0)
    else:
        torch.testing.assert_close(out.embedding, reference.embedding, rtol=0, atol=0)


@pytest.mark.parametrize("name", list_slide_models())
def test_declared_head_is_what_depends_on_the_outputs(name):
    """Every key whose presence or shape changes with the number of outputs is declared
    head, and (where an encoder-only form exists) every head key disappears without outputs."""
    spec = get_slide_model_spec(name)
    shapes = {c: {k: v.shape for k, v in load_slide_model(name, in_dim=IN_DIM, num_outputs=c, tiny=True)
                  .state_dict().items()} for c in ((2, 3) if name == "clam_mb" else (0, 2, 3))}
    varying = {k for k in set(shapes[2]) | set(shapes[3]) if shapes[2].get(k) != shapes[3].get(k)}
    assert varying and all(spec.is_head(k) for k in varying), sorted(k for k in varying if not spec.is_head(k))
    if 0 in shapes:
        assert {k for k in shapes[3] if spec.is_head(k)} == set(shapes[3]) - set(shapes[0])


def test_clam_mb_per_class_parts_are_head():
    spec = get_slide_model_spec("clam_mb")
    for gated, dropout in ((True, 0.25), (False, 0.25), (False, 0.0)):
        model = load_slide_model("clam_mb", in_dim=IN_DIM, num_outputs=3, tiny=True, gated=gated, dropout=dropout)
        attention = model.attention_net[3]
        last = attention.attention_c if gated else attention.module[-1]
        per_class = {f"attention_net.3.{n}" for n, m in attention.named_modules() if m is last}
        head = {k.rsplit(".", 1)[0] for k in model.state_dict() if spec.is_head(k)}
        assert head == per_class | {f"{part}.{c}" for part in ("classifiers", "instance_classifiers")
                                    for c in range(3)}
