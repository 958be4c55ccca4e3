"""Per-iteration schedules: learning rate, teacher temperature, teacher EMA momentum.

``it`` counts optimizer steps from 0; every function is pure, so a resumed run recomputes the
same values from the step alone.
"""

from __future__ import annotations

import math


def cosine(it: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * it / total)) / 2``; ``end`` once ``it >= total``."""
    if total <= 0 or it >= total:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * it / total))


def learning_rate(it: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up ``lr * (it + 1) / warmup`` for ``it < warmup``, then cosine to ``min_lr``."""
    if it < warmup:
        return lr * (it + 1) / warmup
    return cosine(it - warmup, total - warmup, lr, min_lr)


def teacher_temperature(it: int, *, start: float, end: float, warmup: int) -> float:
    """Linear from ``start`` at ``it = 0`` to ``end`` at ``it = warmup``, then ``end``."""
    if it >= warmup:
        return end
    return start + (end - start) * it / warmup


def teacher_momentum(it: int, *, start: float, end: float, total: int) -> float:
    """EMA momentum: cosine from ``start`` at ``it = 0`` to ``end`` at ``it = total``."""
    return cosine(it, total, start, end)
