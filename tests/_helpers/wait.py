"""Waiting on a condition with a deadline: the tests' only way to wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["WAIT", "wait_for"]

T = TypeVar("T")

#: Seconds a wait may take by default before the test fails.
WAIT = 20.0


def wait_for(
    predicate: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = WAIT,
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``predicate`` may raise (an ``AssertionError`` saying a process died, say)
    to fail at once instead of waiting out the deadline.

    Args:
        predicate: The condition; called at once, then every ``interval`` seconds.
        what: What is awaited, for the failure message (or a function making it
            at the time of failure, to show the state then).
        timeout: Seconds before the test fails.
        interval: Seconds between two calls.

    Raises:
        AssertionError: ``predicate`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        time.sleep(interval)
