"""Slide-model registry: lookup errors, strict loading, encoder checkpoints with a new head."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

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
    with pytest.raises(SlideWeightsError, match="cut.pt"):
        load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True, weights=tmp_path / "cut.pt")


def test_masked_softmax_keeps_float64_and_zeroes_padding():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    weights = masked_softmax(scores, mask)
    expected = torch.softmax(scores[:, :3], dim=-1)
    assert weights.dtype == torch.float64 and weights[0, 3] == 0
    torch.testing.assert_close(weights[:, :3], expected, rtol=0, atol=1e-15)
