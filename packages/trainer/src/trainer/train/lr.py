"""The learning rate at each step: linear warmup, then cosine or linear decay to ``min_lr``."""

from __future__ import annotations

import math

from ..config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps; then
    the rate falls to ``min_lr`` at the last step (``cosine`` or ``linear``), or stays (``constant``).
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    span = max(1, total_steps - 1 - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    factor = 1.0 - progress if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor
