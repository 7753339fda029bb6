"""The flow-control options of a task: ``rate_limit``, ``rate_key``, ``concurrency_limit``,
``circuit``, ``batch_size`` and ``batch_wait``, checked when the task is defined.

:func:`flow_options` reads them out of a task's options into a
:class:`FlowOptions`; the worker's flow-control middleware (rate and
concurrency limits, circuits) and its batch collector read that. A mistake is
a :class:`~mqtasks.exceptions.ConfigurationError` at definition, never a
limit silently not kept.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ..types import to_seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .circuit import CircuitBreaker

__all__ = ["FLOW_OPTIONS", "FlowOptions", "Rate", "flow_options", "parse_rate"]

#: The task options read here.
FLOW_OPTIONS = frozenset(
    {"rate_limit", "rate_key", "concurrency_limit", "circuit", "batch_size", "batch_wait"}
)

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")

#: Where to set a result backend, for the errors of options that need one.
_BACKEND_HINT = "App(..., backend='redis://...') or MQTASKS_BACKEND_URL"


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate limit: ``count`` tasks per ``per`` seconds (``"100/s"``: 100 per 1.0)."""

    count: float
    per: float

    @property
    def per_second(self) -> float:
        """Tasks per second."""
        return self.count / self.per

    def __str__(self) -> str:
        return f"{self.count:g}/{self.per:g}s"


def parse_rate(text: str) -> Rate:
    """Parse ``"100/s"``, ``"10/m"``, ``"5/h"`` (also ``"30/10s"``: 30 per 10 seconds).

    Raises:
        ConfigurationError: Not a positive rate with a unit of s, m or h.
    """
    found = _RATE.match(text.lower()) if isinstance(text, str) else None
    unit = _UNITS.get(found.group(3)) if found else None
    if found is None or unit is None:
        raise ConfigurationError(
            f"rate_limit {text!r} is not a rate: write '<count>/<unit>' with the unit "
            "s, m or h, for example '100/s', '10/m' or '30/10s'."
        )
    count = float(found.group(1))
    per = float(found.group(2) or 1) * unit
    if not count > 0 or not per > 0:
        raise ConfigurationError(f"rate_limit {text!r} must be above zero.")
    return Rate(count, per)


@dataclass(frozen=True, slots=True)
class FlowOptions:
    """A task's flow control; every field None when it has none."""

    #: Tasks per period across every worker together (a token bucket in the backend).
    rate_limit: Rate | None = None
    #: The argument whose value picks the bucket: a separate rate per value.
    rate_key: str | None = None
    #: Most runs at once across every worker (lease-based slots in the backend).
    concurrency_limit: int | None = None
    #: The name of the app's circuit breaker the task runs behind.
    circuit: str | None = None
    #: Most items handed to the function at once (one item per message).
    batch_size: int | None = None
    #: Seconds a batch waits for more items before it runs with what it has.
    batch_wait: float | None = None

    @property
    def limited(self) -> bool:
        """Whether a rate or concurrency limit applies."""
        return self.rate_limit is not None or self.concurrency_limit is not None

    @property
    def batched(self) -> bool:
        """Whether the task consumes its messages in batches."""
        return self.batch_size is not None


def _positive_int(name: str, option: str, given: Any) -> int:
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ConfigurationError(
            f"Task {name!r}: {option} must be a whole number >= 1, not {given!r}."
        )
    return given


def flow_options(
    name: str,
    fn: Callable[..., Any],
    options: dict[str, Any],
    *,
    has_backend: bool,
    circuits: Mapping[str, CircuitBreaker],
) -> FlowOptions:
    """Take the flow-control options out of ``options`` (a task's) and check them.

    Raises:
        ConfigurationError: A bad value; ``rate_key`` that names no parameter of the
            function; a limit or circuit without a result backend; a circuit the app
            does not declare; a batch function that does not take one list.
    """
    rate_text = options.pop("rate_limit", None)
    rate_key = options.pop("rate_key", None)
    concurrency = options.pop("concurrency_limit", None)
    circuit = options.pop("circuit", None)
    batch_size = options.pop("batch_size", None)
    batch_wait = options.pop("batch_wait", None)
    rate = parse_rate(rate_text) if rate_text is not None else None
    if rate_key is not None:
        if rate is None:
            raise ConfigurationError(
                f"Task {name!r}: rate_key={rate_key!r} needs a rate_limit to apply per key."
            )
        params = inspect.signature(fn).parameters
        if not isinstance(rate_key, str) or rate_key not in params:
            raise ConfigurationError(
                f"Task {name!r}: rate_key={rate_key!r} is not a parameter of the function "
                f"(it has {list(params)})."
            )
    if concurrency is not None:
        concurrency = _positive_int(name, "concurrency_limit", concurrency)
    if circuit is not None and circuit not in circuits:
        declared = sorted(circuits) or "none"
        raise ConfigurationError(
            f"Task {name!r}: circuit={circuit!r} is not a circuit of the app (declared: "
            f"{declared}). Add CircuitBreaker({circuit!r}, ...) to App(..., circuits=[...])."
        )
    for option, used in (
        ("rate_limit", rate is not None),
        ("concurrency_limit", concurrency is not None),
        ("circuit", circuit is not None),
    ):
        if used and not has_backend:
            raise ConfigurationError(
                f"Task {name!r} sets {option}, which is kept across workers in the result "
                f"backend, and the app has none: {_BACKEND_HINT}."
            )
    wait: float | None = None
    if batch_wait is not None:
        wait = to_seconds(batch_wait)
        if isinstance(batch_wait, bool) or wait is None or not wait > 0:
            raise ConfigurationError(
                f"Task {name!r}: batch_wait must be positive seconds, not {batch_wait!r}."
            )
        if batch_size is None:
            raise ConfigurationError(f"Task {name!r}: batch_wait needs a batch_size.")
    if batch_size is not None:
        batch_size = _positive_int(name, "batch_size", batch_size)
        _check_batch_function(name, fn)
        if wait is None:
            wait = 1.0
    return FlowOptions(
        rate_limit=rate,
        rate_key=rate_key,
        concurrency_limit=concurrency,
        circuit=circuit,
        batch_size=batch_size,
        batch_wait=wait,
    )


def _check_batch_function(name: str, fn: Callable[..., Any]) -> None:
    """A batch task's function takes the list of items as its one required argument."""
    params = list(inspect.signature(fn).parameters.values())
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.default is p.empty and p.kind in (*plain, p.KEYWORD_ONLY)]
    if len(required) != 1 or required[0].kind not in plain:
        raise ConfigurationError(
            f"Task {name!r} sets batch_size: its function must take the list of items as "
            "its one required positional argument (def index(docs: list[dict]) -> None)."
        )
