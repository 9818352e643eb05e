"""The one checkpoint reader: round trips, and an error naming the file for every way a
file can be unreadable (empty, truncated, not a checkpoint, unsafe, another kind),
through each stage that reads checkpoints (slide models, trained models, training
state, tile encoders, ``predict -c``)."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from histoscope.cli.slide_cmds import register
from histoscope.encoders import CorruptWeightsError, load_tile_encoder
from histoscope.io.checkpoint import CheckpointError, checkpoint_kind, read_checkpoint
from histoscope.slide import SlideWeightsError, load_slide_model
from histoscope.slide.trained import load_trained_model
from histoscope.train.checkpoint import load_state, save_state

STATE = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}


def _assert_same(loaded, expected):
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def _cut(path: pathlib.Path, name: str, fraction: float = 0.5) -> pathlib.Path:
    data = path.read_bytes()
    cut = path.with_name(name)
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def _train_state(path: pathlib.Path) -> pathlib.Path:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(path, {"epoch": 0, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "early": {"patience": 1}, "history": []})
    return path


def _trained(path: pathlib.Path, name: str = "abmil") -> pathlib.Path:
    model = load_slide_model(name, in_dim=8, num_outputs=2, tiny=True)
    torch.save({"histoscope_model": name, "arch": {}, "in_dim": 8, "num_outputs": 2,
                "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_files_round_trip_with_pickled_arguments(legacy, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"teacher": STATE, "args": argparse.Namespace(lr=0.5)}, path, _use_new_zipfile_serialization=not legacy)
    loaded = read_checkpoint(path)
    _assert_same(loaded["teacher"], STATE)
    assert loaded["args"].lr == 0.5 and checkpoint_kind(loaded) == "weights"


def test_safetensors_round_trip(tmp_path):
    save_file(STATE, tmp_path / "model.safetensors")
    _assert_same(read_checkpoint(tmp_path / "model.safetensors"), STATE)


@pytest.mark.parametrize("fraction", [0.5, 0.98])
def test_truncated_torch_file(fraction, tmp_path):
    torch.save(STATE, tmp_path / "whole.pt")
    cut = _cut(tmp_path / "whole.pt", "cut.pt", fraction)
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or damaged \(RuntimeError: PytorchStreamReader "
                                              r"failed reading zip archive: failed finding central directory\)"):
        read_checkpoint(cut)


def test_truncated_legacy_torch_file(tmp_path):
    torch.save(STATE, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    cut = _cut(tmp_path / "whole.pt", "cut.pt")
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or damaged"):
        read_checkpoint(cut)


def test_truncated_safetensors_file(tmp_path):
    save_file(STATE, tmp_path / "whole.safetensors")
    cut = _cut(tmp_path / "whole.safetensors", "cut.safetensors", 0.9)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated or damaged safetensors file"):
        read_checkpoint(cut)


def test_empty_file_folder_and_missing_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the file is empty \(0 bytes\)"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.pt")


def test_text_and_binary_files_are_not_checkpoints(tmp_path):
    (tmp_path / "slides.pt").write_text("slide_id,label\nA,1\n")
    with pytest.raises(CheckpointError, match=r"slides\.pt: not a checkpoint: it starts with 'slide_id,label\\nA' "
                                              r"\(text\)"):
        read_checkpoint(tmp_path / "slides.pt")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match=r"image\.pt: not a checkpoint: it starts with bytes 89 50 4e 47"):
        read_checkpoint(tmp_path / "image.pt")


def test_python_objects_are_refused(tmp_path):
    torch.save({"model": STATE, "out": pathlib.PurePosixPath("/runs")}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"unsafe\.pt: it holds Python objects that cannot be loaded safely"):
        read_checkpoint(tmp_path / "unsafe.pt")


def test_kinds_are_recognised_and_enforced(tmp_path):
    state = _train_state(tmp_path / "train_state.pt")
    trained = _trained(tmp_path / "checkpoint.pt")
    torch.save({"model": STATE}, tmp_path / "weights.pth")
    assert [checkpoint_kind(read_checkpoint(p)) for p in (state, trained, tmp_path / "weights.pth")] == \
        ["train_state", "trained", "weights"]
    with pytest.raises(CheckpointError, match=r"train_state\.pt: holds the training state of an unfinished fold "
                                              r".*not a model trained by histoscope train"):
        read_checkpoint(state, kind="trained")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: holds a 'abmil' model trained by histoscope train, "
                                              r"not model weights"):
        read_checkpoint(trained, kind="weights")
    with pytest.raises(CheckpointError, match=r"weights\.pth: holds model weights \(a state dict\) with keys model, "
                                              r"not the training state"):
        read_checkpoint(tmp_path / "weights.pth", kind="train_state")
    assert checkpoint_kind(read_checkpoint(trained, kind=("trained", "weights"))) == "trained"


def test_each_stage_reports_the_file(tmp_path):
    """Slide weights, trained models, training state and tile-encoder weights all go through the reader."""
    torch.save(STATE, tmp_path / "whole.pt")
    cut = _cut(tmp_path / "whole.pt", "cut.pt")
    state = _train_state(tmp_path / "train_state.pt")
    trained = _trained(tmp_path / "checkpoint.pt")

    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated"):
        load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True, weights=cut)
    with pytest.raises(CheckpointError, match=r"train_state\.pt: holds the training state"):
        load_slide_model("abmil", in_dim=8, num_outputs=2, tiny=True, weights=state)
    with pytest.raises(SlideWeightsError, match=r"checkpoint\.pt holds a trained 'abmil' model, not 'transmil'"):
        load_slide_model("transmil", in_dim=8, num_outputs=2, tiny=True, weights=trained)

    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated"):
        load_trained_model(cut)
    with pytest.raises(CheckpointError, match=r"whole\.pt: holds model weights .* not a model trained by histoscope"):
        load_trained_model(tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"train_state\.pt: holds the training state .* rerun histoscope train"):
        load_trained_model(state)

    assert load_state(tmp_path / "absent.pt") is None
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: holds a 'abmil' model trained .* not the training"):
        load_state(trained)

    tiny_vit = dict(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(CorruptWeightsError, match=r"checkpoint\.pt: cannot read the weights file: holds a 'abmil'"):
        load_tile_encoder("uni", weights=trained, **tiny_vit)
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot read the weights file: truncated"):
        load_tile_encoder("uni", weights=cut, **tiny_vit)


@pytest.mark.parametrize("content", ["truncated", "csv", "train_state"])
def test_cli_predict_with_a_bad_checkpoint_fails_in_one_line(content, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        torch.save(STATE, tmp_path / "whole.pt")
        _cut(tmp_path / "whole.pt", path.name)
    elif content == "csv":
        path.write_text("slide_id,label\n")
    else:
        _train_state(path)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["predict", "-c", str(path), "-f", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
