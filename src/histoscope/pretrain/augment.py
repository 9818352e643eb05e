"""Multi-crop augmentation for pathology tiles: DINOv2's recipe plus stain and rotation jitter.

Per tile: two global crops and ``local_number`` local crops, each a random resized crop
(bicubic; area fraction in ``*_scale``, aspect ratio log-uniform in [3/4, 4/3], as
torchvision's ``RandomResizedCrop``), flipped and rotated by multiples of 90° (tissue has
no up), then colour-jittered (brightness, contrast, saturation, hue in random order, as
``ColorJitter``), stain-jittered in HED space, optionally greyed, blurred and solarised.

DINOv2's ``GaussianBlur(p)`` wraps ``RandomApply(p=1 - p)``, so the blur it *applies* has
probability 0 for the first global crop, 0.9 for the second and 0.5 for local crops;
``blur`` states those applied probabilities. Solarisation (p 0.2) is for the second
global crop only, as in DINOv2.

Everything runs on (H, W, 3) uint8 arrays with OpenCV, and every random draw comes from
the numpy ``Generator`` passed in, so a tile's crops are a function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["MultiCropAugment", "hed_jitter", "random_resized_crop_box"]

_LOG_ADJUST = math.log(1e-6)  # skimage's optical-density scale
_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class MultiCropAugment:
    """``augment(tile (H, W, 3) uint8, rng)`` -> (global crops (2, S, S, 3), local crops (n, s, s, 3)) uint8."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_number: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.32)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5  # probability of turning by 90, 180 or 270 degrees
    color_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    hed_jitter: float = 0.5  # probability of stain jitter
    hed_sigma: float = 0.05  # HED channel scale ~ U(1 - sigma, 1 + sigma), shift ~ U(-sigma, sigma) x 0.1
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (0.0, 0.9, 0.5)  # applied probability: global 1, global 2, local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.2  # second global crop only

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        globals_ = np.stack([
            self._crop(tile, rng, self.global_size, self.global_scale, blur=self.blur[i],
                       solarize=self.solarize if i == 1 else 0.0)
            for i in range(2)
        ])
        locals_ = np.stack([
            self._crop(tile, rng, self.local_size, self.local_scale, blur=self.blur[2], solarize=0.0)
            for _ in range(self.local_number)
        ]) if self.local_number else np.zeros((0, self.local_size, self.local_size, 3), np.uint8)
        return globals_, locals_

    def view(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One view (S, S, 3) uint8: a global crop with the first global crop's blur, no solarisation
        (MAE's single random resized crop, with the pathology jitters this recipe enables)."""
        return self._crop(tile, rng, self.global_size, self.global_scale, blur=self.blur[0], solarize=0.0)

    def _crop(self, tile, rng, size, scale, *, blur: float, solarize: float) -> np.ndarray:
        top, left, h, w = random_resized_crop_box(rng, tile.shape[0], tile.shape[1], scale)
        region = tile[top : top + h, left : left + w]
        interpolation = cv2.INTER_AREA if h > size and w > size else cv2.INTER_CUBIC
        x = cv2.resize(region, (size, size), interpolation=interpolation)
        if rng.random() < self.hflip:
            x = x[:, ::-1]
        if rng.random() < self.vflip:
            x = x[::-1]
        if rng.random() < self.rot90:
            x = np.rot90(x, int(rng.integers(1, 4)))
        x = np.ascontiguousarray(x)
        if rng.random() < self.color_jitter:
            x = self._jitter(x, rng)
        if rng.random() < self.hed_jitter:
            x = hed_jitter(x, rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, 3),
                           rng.uniform(-self.hed_sigma, self.hed_sigma, 3) * 0.1)
        if rng.random() < self.grayscale:
            x = np.repeat(_gray(x)[..., None], 3, axis=2)
        if rng.random() < blur:
            sigma = rng.uniform(*self.blur_sigma)
            x = cv2.GaussianBlur(x, (9, 9), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        if rng.random() < solarize:
            x = np.where(x >= 128, 255 - x, x).astype(np.uint8)
        return x

    def _jitter(self, x: np.ndarray, rng) -> np.ndarray:
        factors = {
            "brightness": rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
            "contrast": rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
            "saturation": rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
            "hue": rng.uniform(-self.hue, self.hue),
        }
        for name in np.array(list(factors))[rng.permutation(4)]:
            factor = factors[name]
            if name == "brightness":
                x = _blend(x, np.zeros_like(x, dtype=np.float32), factor)
            elif name == "contrast":
                x = _blend(x, np.full(x.shape, _gray(x).mean(), dtype=np.float32), factor)
            elif name == "saturation":
                x = _blend(x, np.repeat(_gray(x)[..., None].astype(np.float32), 3, axis=2), factor)
            else:
                x = _shift_hue(x, factor)
        return x


def random_resized_crop_box(rng, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the central crop with the ratio clamped
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _gray(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) @ _LUMA).clip(0, 255).astype(np.uint8)


def _blend(x: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    # torchvision's _blend: factor * image + (1 - factor) * other, clamped
    return (factor * x.astype(np.float32) + (1 - factor) * other).clip(0, 255).round().astype(np.uint8)


def _shift_hue(x: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)  # hue over 0..255 = one full turn
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(factor * 256))) % 256
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def hed_jitter(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Stain jitter: each HED channel (skimage's colour deconvolution, Ruifrok & Johnston)
    becomes ``c * scale + shift``.

    ``x`` (H, W, 3) uint8; ``scale``, ``shift`` (3,) for haematoxylin, eosin, DAB. Negative
    stain values are kept (skimage clips them), so unit scale and zero shift give ``x`` back.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    rgb = np.maximum(x.astype(np.float32) / 255.0, 1e-6)
    stains = (np.log(rgb) / _LOG_ADJUST) @ hed_from_rgb.astype(np.float32)  # (H, W, 3)
    stains = stains * scale.astype(np.float32) + shift.astype(np.float32)
    log_rgb = (stains * _LOG_ADJUST) @ rgb_from_hed.astype(np.float32)
    return (np.exp(log_rgb).clip(0, 1) * 255).round().astype(np.uint8)
