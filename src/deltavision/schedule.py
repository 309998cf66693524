"""Learning-rate schedule shared by the trainer and the MIST edge trainer (imports no timm)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_then_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: rises linearly over ``warmup_steps``, then follows a half cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 + 0.5 * math.cos(math.pi * done)

    return factor
