"""When autoscaling grows or shrinks a pool: the policy, in the standard library only.

One policy serves both pools ``mqtasks worker --autoscale MIN,MAX`` scales:
a worker's threads (:mod:`mqtasks.execution.autoscale`, units of one slot) and,
with ``--processes``, the supervisor's children (units of a child's threads),
which the supervisor decides in ``mqtasks/_supervise.py``, a program that
imports nothing outside the standard library; so this module imports nothing
else either, and the supervisor loads it by path.

Celery's autoscaler grows to the number of reserved tasks and, once no task has
come for ``keepalive`` seconds, shrinks to what is reserved. This one grows only
while every slot is busy and work waits (a free slot means the pool is big
enough, however long the queue), straight to what the backlog asks for; and it
shrinks one unit at a time, each after an idle period in which a whole unit
stayed unused and nothing waited, so a pool that is merely between bursts keeps
its size.
"""

from __future__ import annotations

import math

__all__ = ["BOUNDS", "GROW", "IDLE", "ScalePolicy"]

#: Reason of a change: every slot was busy and work waited.
GROW = "backlog"
#: Reason of a change: a unit stayed unused, with nothing waiting, for the idle period.
IDLE = "idle"
#: Reason of a change: the size was outside ``[minimum, maximum]``.
BOUNDS = "bounds"


class ScalePolicy:
    """Decides a pool's next size from its load, between ``minimum`` and ``maximum`` units.

    Args:
        minimum: The fewest units (at least 1).
        maximum: The most units (at least ``minimum``).
        idle: Seconds a unit must stay unused, with nothing waiting, before the
            pool shrinks by one unit.
        unit: Slots per unit (1 for threads; a child's threads for processes).

    Raises:
        ValueError: The bounds or the idle period are impossible.
    """

    def __init__(self, minimum: int, maximum: int, *, idle: float = 30.0, unit: int = 1) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(
                f"autoscale bounds must satisfy 1 <= MIN <= MAX, not MIN={minimum}, MAX={maximum}."
            )
        if idle < 0 or unit < 1:
            raise ValueError("the idle period must be >= 0 and a unit at least one slot.")
        self.minimum = minimum
        self.maximum = maximum
        self.idle = idle
        self.unit = unit
        #: Since when (``now`` as given to :meth:`decide`) a unit has been unused and nothing waited.
        self.quiet_since: float | None = None

    def clamp(self, size: int) -> int:
        """``size`` brought within the bounds."""
        return max(self.minimum, min(self.maximum, size))

    def decide(self, size: int, busy: int, waiting: int, now: float) -> tuple[int, str] | None:
        """Return the next size and the reason of the change, or None to stay.

        Args:
            size: Units now.
            busy: Slots running a task now (over all units).
            waiting: Messages waiting: ready in the broker, and received but not running.
            now: A monotonic clock reading; the idle period is measured with it.
        """
        if size != self.clamp(size):
            self.quiet_since = None
            return self.clamp(size), BOUNDS
        slots = size * self.unit
        if waiting > 0 or busy > slots - self.unit:
            self.quiet_since = None  # work waits, or no whole unit is free: not idle
            if waiting > 0 and busy >= slots:
                target = self.clamp(size + math.ceil(waiting / self.unit))
                if target > size:
                    return target, GROW
            return None
        if self.quiet_since is None:
            self.quiet_since = now
            return None
        if now - self.quiet_since < self.idle or size <= self.minimum:
            return None
        self.quiet_since = now  # the next unit goes after another idle period
        return size - 1, IDLE
