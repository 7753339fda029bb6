"""The type aliases every layer shares, and the one place a duration becomes seconds.

Headers and durations cross every layer (the transport, messages, tasks, the
worker); naming them here keeps one meaning for each, and ``to_seconds``
normalises a ``timedelta`` once, at the edge. A leaf module: any layer may
import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, TypeAlias

#: Message headers as they travel with a message: string keys, scalar values.
Headers: TypeAlias = Mapping[str, Any]

#: A duration in seconds, or a ``timedelta`` normalised once at the edge.
Seconds: TypeAlias = float | int | timedelta

__all__ = ["Headers", "Seconds", "to_seconds"]


def to_seconds(value: Seconds | None) -> float | None:
    """Normalise a duration to float seconds (``None`` stays ``None``).

    Args:
        value: Seconds as a number, or a ``timedelta``.

    Raises:
        ValueError: The duration is negative.
    """
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds} s")
    return seconds
