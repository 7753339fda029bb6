"""Circuit breakers: the declaration an app is given (``App(..., circuits=[...])``).

A task declared with ``circuit="payments"`` runs behind the app's breaker of
that name. What the breaker does across workers (its state in the result
backend, the probe while half-open, the deferral of tasks while open) lives
in ``mqtasks.middleware.circuits``; this module is only the declaration, checked
when it is made.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ConfigurationError

__all__ = ["CircuitBreaker", "circuits_by_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


@dataclass(frozen=True)
class CircuitBreaker:
    """A breaker shared by every worker of the app, around a dependency that can fail.

    Args:
        name: Tasks join it with ``@app.task(circuit=name)``.
        failure_threshold: Failures within ``window`` that open it.
        window: Seconds over which failures are counted.
        reset_timeout: Seconds it stays open before one probe runs (half-open).
        trip_on: Exception types that count as failures of the dependency; others
            (a bug in the task, bad input) are the task's own and do not count.
    """

    name: str
    failure_threshold: int = 5
    window: float = 60.0
    reset_timeout: float = 30.0
    trip_on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigurationError(
                f"CircuitBreaker name {self.name!r}: use letters, digits and . _ : - "
                "(at most 100 characters)."
            )
        threshold = self.failure_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(
                f"CircuitBreaker {self.name!r}: failure_threshold must be a whole number >= 1."
            )
        for option in ("window", "reset_timeout"):
            value: Any = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(
                    f"CircuitBreaker {self.name!r}: {option} must be positive seconds."
                )
        trip_on = self.trip_on
        if isinstance(trip_on, type):
            trip_on = (trip_on,)
            object.__setattr__(self, "trip_on", trip_on)
        if not trip_on or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in trip_on
        ):
            raise ConfigurationError(
                f"CircuitBreaker {self.name!r}: trip_on must be exception types."
            )
        object.__setattr__(self, "trip_on", tuple(trip_on))


def circuits_by_name(circuits: Iterable[CircuitBreaker]) -> dict[str, CircuitBreaker]:
    """Index ``circuits`` by name.

    Raises:
        ConfigurationError: Not a CircuitBreaker, or two with one name.
    """
    found: dict[str, CircuitBreaker] = {}
    for circuit in circuits:
        if not isinstance(circuit, CircuitBreaker):
            raise ConfigurationError(
                f"App(circuits=...) takes CircuitBreaker objects, not {circuit!r}."
            )
        if circuit.name in found:
            raise ConfigurationError(f"Two circuit breakers are named {circuit.name!r}.")
        found[circuit.name] = circuit
    return found
