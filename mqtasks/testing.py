"""Helpers for testing tasks: an app on ``memory://``, a worker in a thread, ``drain()``.

Also a pytest plugin (registered as ``mqtasks``) providing the fixtures
``mqtasks_app`` and ``mqtasks_worker``::

    def test_add(mqtasks_app, mqtasks_worker):
        add.delay(2, 3)
        drain(mqtasks_worker)        # re-raises the task's exception, if any
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from .app import App
from .transport.memory import MemoryTransport
from .worker import Worker

__all__ = ["drain", "memory_app", "reset", "running_worker"]


def memory_app(name: str = "test", **overrides: Any) -> App:
    """Return an app on its own, isolated ``memory://`` broker."""
    overrides.setdefault("broker", "memory://")
    return App(name, **overrides)


def reset(app: App) -> None:
    """Empty the app's memory broker (no-op for other transports) and close its connections."""
    transport = app._transport
    if isinstance(transport, MemoryTransport):
        transport.reset()
    app.close()


@contextlib.contextmanager
def running_worker(app: App, **options: Any) -> Iterator[Worker]:
    """Run a worker in background threads for the duration of the ``with`` block.

    Task exceptions are collected so that :func:`drain` can re-raise them.
    """
    options.setdefault("collect_errors", True)
    options.setdefault("concurrency", 2)
    options.setdefault("shutdown_timeout", 5.0)
    worker = Worker(app, **options)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def drain(worker: Worker, timeout: float = 10.0, *, raise_errors: bool = True) -> None:
    """Wait until the worker's queues are empty and it holds no message.

    Args:
        worker: A started worker (with ``collect_errors=True`` to see errors).
        timeout: Seconds to wait before giving up.
        raise_errors: Re-raise the first task exception (or rejection) seen since
            the last drain.

    Raises:
        TimeoutError: The queues did not empty in time.
        Exception: The first error a task raised, when ``raise_errors`` is set.
    """
    app = worker.app
    specs = [app.queue(q) for q in worker.queues]
    deadline = time.monotonic() + timeout
    stable, last = 0, -1
    while True:
        ready = sum(app.transport.message_counts(specs).values())
        ready += sum(app.transport.delayed_counts(specs).values())
        if ready == 0 and worker.idle and worker.received == last:
            stable += 1
            if stable >= 2:
                break
        else:
            stable = 0
        last = worker.received
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"queues {worker.queues} not drained after {timeout} s "
                f"(ready={ready}, running={worker.running})"
            )
        time.sleep(0.01)
    if raise_errors and worker.errors:
        _, exc = worker.errors[0]
        worker.errors.clear()
        raise exc


# -- pytest plugin -----------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
else:

    @pytest.fixture
    def mqtasks_app() -> Iterator[App]:
        """A fresh app on an isolated ``memory://`` broker, reset at teardown."""
        app = memory_app()
        yield app
        reset(app)

    @pytest.fixture
    def mqtasks_worker(mqtasks_app: App) -> Iterator[Worker]:
        """A worker on ``mqtasks_app``, started before the test and stopped after it.

        Register the test's tasks before requesting this fixture (or pass
        ``queues``): the worker consumes the queues known when it starts.
        """
        with running_worker(mqtasks_app) as worker:
            yield worker
