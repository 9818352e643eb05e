"""What every objective that trains a registry tile encoder shares: pixels in, encoder out.

Images arrive as uint8 and are normalised with the encoder's published mean and std;
the eval hook embeds tiles exactly as ``histoscope embed`` will with the exported
weights (the spec's pooling on the encoder module); the export writes the encoder
module's state dict in its published key layout (``spec.checkpoint_format``), with a
JSON note giving the ``histoscope embed`` command and the architecture overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from histoscope.pretrain.objective import Objective

__all__ = ["EncoderObjective"]


class EncoderObjective(Objective):
    """An :class:`Objective` whose product is a tile encoder of the registry.

    Subclasses call :meth:`_setup_encoder` in ``__init__`` and implement
    :meth:`exported_encoder` (the encoder module to embed with and to export).
    """

    tag: str  # the objective's name, part of the exported file name

    def _setup_encoder(self, *, spec, encoder: str, arch: dict, input_size: int, tag: str) -> None:
        self.spec, self.encoder_name, self.arch, self.input_size, self.tag = spec, encoder, dict(arch), input_size, tag
        self.register_buffer("mean", torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.preprocess.std).view(1, 3, 1, 1), persistent=False)

    def exported_encoder(self) -> nn.Module:
        raise NotImplementedError

    def export_note(self) -> dict:
        """Extra entries of the export's JSON note."""
        return {}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, H, W) with the encoder's published mean and std."""
        return (images.float() / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        size = self.input_size
        x = tiles.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = self.normalize(x.clamp(0, 255))
        model = self.exported_encoder()
        was_training = model.training
        model.eval()
        out = self.spec.pooling.pool(model, model(x))
        model.train(was_training)
        return out.float()

    def export(self, out_dir: Path) -> Path:
        """``OUT/export/<encoder>_<tag>.safetensors`` in the encoder's published key layout, plus a
        JSON note with the architecture overrides ``histoscope embed --arch`` needs."""
        from safetensors.torch import save_file

        from histoscope.encoders.convert import export_checkpoint
        from histoscope.io.atomic import atomic_path, write_json

        state = export_checkpoint(self.spec.checkpoint_format, {
            k: v.detach().cpu().contiguous() for k, v in self.exported_encoder().state_dict().items()})
        name = self.encoder_name.replace(":", "_").replace("/", "_")
        path = Path(out_dir) / "export" / f"{name}_{self.tag}.safetensors"
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"histoscope": json.dumps({"encoder": self.encoder_name,
                                                                           "arch": self.arch})})
        arch = " ".join(f"--arch {k}={json.dumps(v)}" for k, v in self.arch.items())
        write_json(path.with_suffix(".json"), {
            "encoder": self.encoder_name, "arch": self.arch, "checkpoint_format": self.spec.checkpoint_format,
            **self.export_note(),
            "embed": f"histoscope embed SLIDES --out OUT --encoder {self.encoder_name} --weights {path} {arch}".strip(),
        })
        return path
