"""Embed a set of image files with a registered tile encoder, cached on disk.

Images are decoded and preprocessed (the encoder's published ``transform``) by a pool
of threads while the model runs batch after batch. The embeddings are cached in
``cache_dir/<encoder>-<key>.h5``, the key hashing the encoder, its weights (file path,
size and time; ``random`` with the seed; the Hub), architecture overrides, dtype and
every image's path, size and modification time, so a rerun with other protocols
reuses them and any change re-embeds. An unreadable image is reported and left out,
it does not stop the others.

Notation: N images, D embedding dim.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["embed_images", "embedding_cache_key", "embedding_cache_path"]


def _stat(path: Path) -> list:
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), sum(p.stat().st_size for p in files), max((p.stat().st_mtime_ns for p in files), default=0)]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _weights_identity(encoder: str, weights: str | Path | None, seed: int) -> str:
    if weights is None:
        return f"hub:{encoder}"
    if str(weights) == "random":
        return f"random:seed={seed}+crc32({encoder})"
    return json.dumps(_stat(Path(weights)))


def embedding_cache_key(paths: Sequence[Path], *, encoder: str, weights: str | Path | None, arch: dict[str, Any],
                        dtype: str, seed: int) -> str:
    """Hex digest naming one encoder+weights+files combination."""
    description = {"encoder": encoder, "weights": _weights_identity(encoder, weights, seed),
                   "arch": {k: arch[k] for k in sorted(arch)}, "dtype": dtype,
                   "files": [_stat(p) if Path(p).exists() else [str(p), None, None] for p in paths]}
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def embedding_cache_path(cache_dir: str | Path, encoder: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder)
    return Path(cache_dir) / f"{safe}-{key[:16]}.h5"


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("key") != key:
                return None
            return f["features"][:], f["ok"][:].astype(bool)
    except (OSError, KeyError):
        return None


def _write_cache(path: Path, key: str, features: np.ndarray, ok: np.ndarray, attrs: dict[str, Any]) -> None:
    import h5py

    from histoscope.io.atomic import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("ok", data=ok)
        f.attrs["key"] = key
        for name, value in attrs.items():
            f.attrs[name] = "None" if value is None else value


def _load_image(path: Path, transform) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))  # writable, as torch.from_numpy wants
        return transform(pixels)  # (1, 3, h, w)
    except (OSError, ValueError) as error:  # unreadable or truncated file
        return f"{path}: {error}"


def embed_images(paths: Sequence[str | Path], *, encoder: str, weights: str | Path | None = None,
                 arch: dict[str, Any] | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 64, workers: int = 4, seed: int = 0, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, D) float32, ok (N,) bool)`` of the images at ``paths``.

    Rows of unreadable images are zero with ``ok`` False (and logged). ``weights`` as
    for :func:`histoscope.load_tile_encoder` (``"random"``: untrained weights drawn
    with ``seed`` and the encoder's name); ``arch`` are architecture overrides (tiny variants).
    """
    import torch

    from histoscope import load_tile_encoder
    from histoscope.utils.device import resolve_device, resolve_dtype

    log = log or (lambda message: None)
    arch = dict(arch or {})
    paths = [Path(p) for p in paths]
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    key = embedding_cache_key(paths, encoder=encoder, weights=weights, arch=arch, dtype=str(torch_dtype), seed=seed)
    cache = embedding_cache_path(cache_dir, encoder, key) if cache_dir is not None else None
    if cache is not None and (cached := _read_cache(cache, key)) is not None:
        log(f"{encoder}: embeddings from the cache {cache}")
        return cached
    if str(weights) == "random":  # seeded, and different for encoders of one shape
        weights = f"random:{seed + zlib.crc32(encoder.encode())}"
    model = load_tile_encoder(encoder, weights=weights, device=torch_device, dtype=torch_dtype, **arch)
    features = np.zeros((len(paths), model.embed_dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, torch.inference_mode():
        def submit(start: int) -> list:
            return [pool.submit(_load_image, paths[i], model.transform)
                    for i in range(start, min(start + batch_size, len(paths)))]

        pending = submit(0)
        for start in range(0, len(paths), batch_size):
            rows = range(start, min(start + batch_size, len(paths)))
            loaded = [future.result() for future in pending]
            pending = submit(start + batch_size)  # the next batch decodes while this one runs
            good = [i for i, item in zip(rows, loaded) if not isinstance(item, str)]
            for item in loaded:
                if isinstance(item, str):
                    log(f"skipped unreadable image {item}")
            by_shape: dict[tuple, list[int]] = {}  # images of other aspect ratios resize to other shapes
            for i in good:
                by_shape.setdefault(tuple(loaded[i - start].shape), []).append(i)
            for group in by_shape.values():
                batch = torch.cat([loaded[i - start] for i in group]).to(torch_device)
                features[group] = model(batch).float().cpu().numpy()
                ok[group] = True
    log(f"{encoder}: embedded {int(ok.sum())} of {len(paths)} images")
    if cache is not None:
        _write_cache(cache, key, features, ok, {"encoder": encoder, "weights": str(weights),
                                                "weights_sha256": model.weights_sha256, "dtype": str(torch_dtype)})
    return features, ok
