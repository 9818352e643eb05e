"""iBOT's block-wise masks, drawn as DINOv2 draws them (``dinov2/data/masking.py``, ``collate.py``).

A mask is built from rectangular blocks of patches (area between ``min_num_patches``
and what is still missing, aspect ratio log-uniform in [0.3, 1/0.3]) until it has the
requested number of patches or no block fits. Per batch of global crops, a fraction
``mask_probability`` of the images is masked, their target ratios spread evenly over
``mask_ratio_min_max`` (image i draws from the i-th of n equal bands), and the masks are
shuffled over the images.

Randomness comes from an explicit generator with ``random()``, ``integers(lo, hi)`` and
``permutation(n)`` (numpy's ``Generator``), so masks are a function of the seed; a uniform
draw on [a, b] is ``a + (b - a) * random()`` as Python's ``random.uniform`` (also for a > b).

Notation: I images (global crops), g x g patch grid, N = g * g tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "draw_masks"]


def _uniform(rng, a: float, b: float) -> float:
    return a + (b - a) * rng.random()


class BlockMaskGenerator:
    """``generator(rng, num_masking_patches)`` -> (g, g) bool mask with about that many patches set."""

    def __init__(self, *, input_size: int | tuple[int, int], max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def for_crops(cls, *, crop_size: int, patch_size: int) -> BlockMaskGenerator:
        """DINOv2's generator for ``crop_size``-px crops: blocks up to half the grid."""
        grid = crop_size // patch_size
        # DINOv2 writes 0.5 * img_size // patch_size * img_size // patch_size (evaluated left to right)
        return cls(input_size=(grid, grid), max_num_patches=0.5 * crop_size // patch_size * crop_size // patch_size)

    def _add_block(self, rng, mask: np.ndarray, max_mask_patches: float) -> int:
        delta = 0
        for _ in range(10):
            target_area = _uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:  # the block adds something, not too much
                    block = mask[top : top + h, left : left + w]
                    delta += int((~block).sum())
                    block[:] = True
                if delta > 0:
                    break
        return delta

    def __call__(self, rng, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = num_masking_patches - count
            if self.max_num_patches is not None:
                max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._add_block(rng, mask, max_mask_patches)
            if delta == 0:
                break
            count += delta
        return mask


def draw_masks(rng, generator: BlockMaskGenerator, *, n_images: int, mask_ratio_min_max: tuple[float, float],
               mask_probability: float) -> torch.Tensor:
    """(I, N) bool masks for I global crops, as DINOv2's ``collate_data_and_cast``."""
    n_tokens = generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    probs = torch.linspace(*mask_ratio_min_max, n_masked_images + 1)  # float32, as the reference
    masks = []
    for i in range(n_masked_images):
        lo, hi = probs[i], probs[i + 1]
        ratio = lo + (hi - lo) * rng.random()  # float32, as random.uniform on the reference's tensors
        masks.append(generator(rng, int(n_tokens * ratio)))
    masks += [generator(rng, 0) for _ in range(n_masked_images, n_images)]
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_images, -1))
