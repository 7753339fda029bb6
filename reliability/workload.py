"""The work the harness publishes: one task call (:class:`Job`) and the W-mix durations."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WMIX_MEAN_S", "Job", "wmix_ms"]

#: W-mix mean task time, seconds (for run-time estimates only).
WMIX_MEAN_S = 0.031


@dataclass(frozen=True)
class Job:
    """One task call to publish."""

    task: str
    args: tuple[Any, ...]
    options: dict[str, Any] = field(default_factory=dict)


def wmix_ms(rng: random.Random) -> float:
    """W-mix task duration: 90 % 1-10 ms, 9 % 50-200 ms, 1 % 1-2 s."""
    x = rng.random()
    if x < 0.90:
        return round(rng.uniform(1, 10), 2)
    if x < 0.99:
        return round(rng.uniform(50, 200), 2)
    return round(rng.uniform(1000, 2000), 2)
