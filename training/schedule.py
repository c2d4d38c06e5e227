"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``.

A pure function of the optimizer step, so resuming needs no scheduler state: the trainer sets the lr
of every param group before each optimizer step.
"""
from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * max_steps)


def lr_at(step: int, max_steps: int, lr: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """lr for optimizer step ``step`` (1-based: the first update uses step 1, never lr 0)."""
    w = warmup_steps(max_steps, warmup_ratio)
    if w and step <= w:
        return lr * step / w
    if max_steps <= w:
        return lr
    progress = min(1.0, (step - w) / (max_steps - w))
    lo = lr * min_lr_ratio
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
