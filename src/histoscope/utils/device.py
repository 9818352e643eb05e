"""Device and dtype choice, probed when asked (never at import time)."""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["resolve_device", "best_dtype", "resolve_dtype", "cpu_has_bf16", "autocast"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX-512 BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available on this machine; use --device cpu")
    return device


def best_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (Ampere+ GPUs, AMX/AVX-512-BF16
    CPUs), fp16 on older GPUs, fp32 otherwise."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return best_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return _DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in ``dtype`` on ``device``; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
