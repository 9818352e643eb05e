"""Pair inputs as model batches, and the embeddings of a whole pair table.

Features files are read once and kept in memory; images are decoded when batched and
preprocessed with the model's published transform. A file that cannot be read is
reported and left out by :meth:`PairInputs.check`, before anything trains on it.

Notation: B pairs in a batch, N tokens (padded to the longest), D feature dim, E joint dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from histoscope.io.pairs import Pair, read_pair_features, read_pair_image

__all__ = ["PairInputs", "embed_pairs"]


class PairInputs:
    """The image or features side of ``pairs``, batched: ``batch(indices) -> (x, mask)``."""

    def __init__(self, pairs: Sequence[Pair]):
        kinds = {pair.kind for pair in pairs}
        if len(kinds) > 1:
            raise ValueError("a pair table for one model holds images or features files, not both "
                             f"({sum(p.kind == 'image' for p in pairs)} images, "
                             f"{sum(p.kind == 'features' for p in pairs)} features files)")
        self.pairs = list(pairs)
        self.kind = kinds.pop() if kinds else "features"
        self._features: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def features_dim(self) -> int | None:
        return next(iter(self._features.values())).shape[1] if self._features else None

    def check(self) -> tuple[PairInputs, list[str]]:
        """The inputs whose files read (features) or open (images), and one line per pair left out.

        Features of another width than most of the table's are left out too.
        """
        read, problems = [], []
        for pair in self.pairs:
            try:
                if self.kind == "features":
                    self._features[pair.row] = read_pair_features(pair.path)
                else:
                    from PIL import Image

                    with Image.open(pair.path) as image:
                        image.verify()
                read.append(pair)
            except Exception as error:  # h5py, numpy and PIL raise many types for a damaged file
                message = str(error) if str(pair.path) in str(error) else f"{pair.path}: {error}"
                problems.append(f"row {pair.row}: {message}")
        kept = read
        if self.kind == "features" and read:
            widths = [self._features[p.row].shape[1] for p in read]
            width = max(set(widths), key=widths.count)
            kept = [p for p, w in zip(read, widths) if w == width]
            problems += [f"row {p.row}: {p.path}: features are {w} wide, most of the table's are {width}"
                         for p, w in zip(read, widths) if w != width]
        checked = PairInputs(kept)
        checked.kind = self.kind
        checked._features = {p.row: self._features[p.row] for p in kept if p.row in self._features}
        return checked, problems

    def subset(self, indices: Sequence[int]) -> PairInputs:
        subset = PairInputs([self.pairs[i] for i in indices])
        subset.kind = self.kind
        subset._features = self._features
        return subset

    def batch(self, indices: Sequence[int], transform: Callable | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, 3, H, W) and None, or features (B, N, D) and a mask (B, N) (None if no padding)."""
        pairs = [self.pairs[i] for i in indices]
        if self.kind == "image":
            if transform is None:
                raise ValueError("this model reads features, but the pair table lists images")
            return torch.cat([transform(read_pair_image(p.path)) for p in pairs]), None
        rows = [torch.from_numpy(self._features[p.row] if p.row in self._features else read_pair_features(p.path))
                for p in pairs]
        lengths = torch.tensor([len(r) for r in rows])
        features = pad_sequence(rows, batch_first=True)  # (B, N, D)
        if bool((lengths == lengths[0]).all()):
            return features, None
        return features, torch.arange(features.shape[1])[None] < lengths[:, None]


@torch.no_grad()
def embed_pairs(model, inputs: PairInputs, ids: torch.Tensor, *, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption embeddings (n, E), float32 on the CPU; ``ids`` (n, L) the captions."""
    model.eval()
    transform = model.transform if inputs.kind == "image" else None
    images, texts = [], []
    for start in range(0, len(inputs), batch_size):
        indices = range(start, min(start + batch_size, len(inputs)))
        x, mask = inputs.batch(indices, transform)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            images.append(model.encode_image(x.to(device), None if mask is None else mask.to(device)).float().cpu())
            texts.append(model.encode_text(ids[start : start + len(indices)].to(device)).float().cpu())
    return torch.cat(images), torch.cat(texts)
