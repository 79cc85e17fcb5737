"""The official learning-rate schedule, as a pure function of the optimizer step (nothing to save but the step).

Linear warm-up from 0 over `warmup_epochs`, then half a cosine down to `min_lr` at the end of `epochs`;
epochs are counted in fractions of an epoch, as in the official `adjust_learning_rate`.
"""

from __future__ import annotations

import math


def learning_rate(step: int, steps_per_epoch: int, peak: float, min_lr: float, warmup_epochs: float,
                  epochs: int) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs) if epochs > warmup_epochs else 1.0
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
