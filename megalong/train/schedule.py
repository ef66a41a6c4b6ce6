"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr."""
from __future__ import annotations

import math

from megalong.config import TrainConfig


def learning_rate(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    decay_steps = (t.lr_decay_steps or t.train_steps) - t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, decay_steps))
    if t.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return t.min_lr + (t.lr - t.min_lr) * factor
