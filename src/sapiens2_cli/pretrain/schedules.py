"""Per-iteration schedules of the objective: teacher temperature, teacher EMA momentum.

``it`` counts optimizer steps from 0; every function is pure, so a resumed run recomputes the
same values from the step alone. The learning rate follows the shared schedule
(``train/optim.py``: linear warm-up, then cosine to ``schedule.final_lr``).
"""

from __future__ import annotations

import math


def cosine(it: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * it / total)) / 2``; ``end`` once ``it >= total``."""
    if total <= 0 or it >= total:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * it / total))


def teacher_temperature(it: int, *, start: float, end: float, warmup: int) -> float:
    """Linear from ``start`` at ``it = 0`` to ``end`` at ``it = warmup``, then ``end``."""
    if it >= warmup:
        return end
    return start + (end - start) * it / warmup


def teacher_momentum(it: int, *, start: float, end: float, total: int) -> float:
    """EMA momentum: cosine from ``start`` at ``it = 0`` to ``end`` at ``it = total``."""
    return cosine(it, total, start, end)
