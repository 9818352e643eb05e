"""Per-iteration schedules (learning rate, weight decay, teacher momentum and temperature).

:func:`cosine_schedule` is DINOv2's ``CosineScheduler``: ``freeze_iters`` zeros, a linear
warm-up from ``start_warmup_value`` (``np.linspace``, so its last value is ``base_value``),
then a half cosine from ``base_value`` to ``final_value``; past the end it stays at
``final_value``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "Schedule"]


class Schedule:
    """A precomputed schedule indexed by iteration: ``schedule[it]``."""

    def __init__(self, values: np.ndarray, final_value: float):
        self.values = values
        self.final_value = final_value

    def __getitem__(self, it: int) -> float:
        return float(self.values[it]) if it < len(self.values) else float(self.final_value)

    def __len__(self) -> int:
        return len(self.values)


def cosine_schedule(*, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup_value: float = 0.0, freeze_iters: int = 0) -> Schedule:
    if warmup_iters + freeze_iters > total_iters:
        raise ValueError(f"warm-up ({warmup_iters}) and freeze ({freeze_iters}) iterations exceed the "
                         f"{total_iters} of the schedule")
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters))) \
        if len(iters) else np.zeros(0)
    return Schedule(np.concatenate((freeze, warmup, cosine)), final_value)
