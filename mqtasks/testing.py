"""Helpers for testing tasks: an app on ``memory://`` (with a ``memory://`` result
backend) or on fakeredis, a worker in a thread, ``drain()``.

Also a pytest plugin (registered as ``mqtasks``) providing the fixtures
``mqtasks_app``, ``mqtasks_worker`` and ``mqtasks_start_worker``, and
``mqtasks_fake_redis_app`` and ``mqtasks_fake_redis_worker`` for the real
``redis://`` transport on an in-process fakeredis server
(``pip install 'mqtasks[testing]'``)::

    def test_add(mqtasks_app, mqtasks_worker):
        add.delay(2, 3)
        drain(mqtasks_worker)        # re-raises the task's exception, if any

    def test_result(mqtasks_app, mqtasks_start_worker):
        @mqtasks_app.task
        def add(x: int, y: int) -> int:
            return x + y

        mqtasks_start_worker()       # after the tasks are registered
        assert add.delay(2, 3).get(timeout=5) == 5

fakeredis is imported here only, when a fakeredis app is asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .app import App
from .exceptions import ConfigurationError
from .ordering.options import ordered_queues
from .ordering.queues import partitions_of
from .worker import Worker

if TYPE_CHECKING:
    import fakeredis

__all__ = ["FAKE_REDIS_URL", "drain", "fake_redis_app", "memory_app", "reset", "running_worker"]

#: The broker URL of :func:`fake_redis_app`'s apps; its host only names the fake in logs.
FAKE_REDIS_URL = "redis://fakeredis/0"

#: How often a consumer on fakeredis looks for new and due messages: it polls, as its
#: connections have no socket to wait on, so a short interval keeps tests quick.
_FAKE_REDIS_POLL_INTERVAL = 0.02


#: The result backend of :func:`memory_app`'s apps: in memory, one store per app.
_MEMORY_BACKEND_URL = "memory://"


def memory_app(name: str = "test", **overrides: Any) -> App:
    """Return an app on its own, isolated ``memory://`` broker and ``memory://`` result backend.

    A worker of the app stores results, so a test can wait for one, and
    workflows (chain, group, chord) run as in production::

        app = memory_app()

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        with running_worker(app):
            assert add.delay(2, 3).get(timeout=5) == 5

    Args:
        name: The app's name.
        overrides: :class:`~mqtasks.App` arguments or settings; ``backend=None``
            for no result backend (unless ``MQTASKS_BACKEND_URL`` names one).
    """
    overrides.setdefault("broker", "memory://")
    overrides.setdefault("backend", _MEMORY_BACKEND_URL)
    return App(name, **overrides)


def fake_redis_app(
    name: str = "test", *, server: fakeredis.FakeServer | None = None, **overrides: Any
) -> App:
    """Return an app on the real ``redis://`` transport, talking to an in-process
    fakeredis server instead of a Redis: its Lua scripts, delayed sorted sets and
    dead-letter lists run as on Redis, with no server to start.

    Each call gets a server of its own unless ``server`` is given: pass the same
    ``fakeredis.FakeServer`` to apps that share queues. ``app.transport.publisher()``
    is a redis-py client of the app's server, to read its keys.

    Args:
        name: The app's name.
        server: The fakeredis server to talk to; a new one by default.
        overrides: :class:`~mqtasks.App` arguments. ``transport_options`` are
            kept, with ``connection_class`` set to fakeredis' (and
            ``delay_poll_interval`` 0.02 s unless given).

    Raises:
        ConfigurationError: fakeredis or lupa (its Lua engine) is not installed.
        TypeError: ``broker`` is given: the fake is always ``redis://``.
    """
    if "broker" in overrides:
        raise TypeError("fake_redis_app() sets the broker itself; drop broker=.")
    options = dict(overrides.pop("transport_options", None) or {})
    options["connection_class"] = _fake_connection_class(server)
    options.setdefault("delay_poll_interval", _FAKE_REDIS_POLL_INTERVAL)
    return App(name, broker=FAKE_REDIS_URL, transport_options=options, **overrides)


def _fake_connection_class(server: fakeredis.FakeServer | None) -> type[Any]:
    """A fakeredis connection class bound to ``server`` (a new one if None)."""
    try:
        import fakeredis
    except ImportError as exc:
        raise ConfigurationError(
            "fake_redis_app() needs fakeredis with Lua: pip install 'mqtasks[testing]'."
        ) from exc
    if importlib.util.find_spec("lupa") is None:
        raise ConfigurationError(
            "fake_redis_app() needs lupa to run the transport's Lua scripts on fakeredis: "
            "pip install 'mqtasks[testing]' (or 'fakeredis[lua]')."
        )
    bound = fakeredis.FakeServer() if server is None else server

    class BoundFakeRedisConnection(fakeredis.FakeRedisConnection):
        """Every connection of one app talks to the same fake server."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(server=bound, **kwargs)

    return BoundFakeRedisConnection


def reset(app: App) -> None:
    """Empty the app's memory broker and memory result backend (no-op for others) and
    close its connections."""
    transport = app._transport
    if transport is not None and transport.capabilities.in_process:
        transport.reset()
    app.close()
    if app._backend is not None and (app.settings.backend_url or "").startswith("memory:"):
        app._backend = None  # the next use makes an empty store


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
    # With the partition queues of ordered tasks, which the worker consumes as it owns them.
    names = [*worker.queues, *partitions_of(app, worker.queues)]
    specs = [app.queue(q) for q in names]
    # A queue the broker orders itself (an SQS FIFO queue) holds an ordered task's
    # retry in place, in flight and unseen by the counts above: count those too.
    ordered = ordered_queues(app.tasks.values())
    in_place = [
        spec
        for spec in specs
        if spec.name in ordered and app.transport.native_ordering_refused(spec.name) is None
    ]
    deadline = time.monotonic() + timeout
    stable, last = 0, -1
    while True:
        ready = sum(app.transport.message_counts(specs).values())
        ready += sum(app.transport.delayed_counts(specs).values())
        if in_place:
            stats = app.transport.queue_stats(in_place).values()
            ready += sum(s.unacked or 0 for s in stats)
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
        """A fresh app on an isolated ``memory://`` broker and result backend, reset at teardown."""
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

    @pytest.fixture
    def mqtasks_start_worker(mqtasks_app: App) -> Iterator[Callable[..., Worker]]:
        """A function that starts a worker on ``mqtasks_app``; it is stopped after the test.

        Call it once the test has registered its tasks (the worker consumes the
        queues known when it starts); keyword arguments go to
        :func:`running_worker`::

            def test_add(mqtasks_app, mqtasks_start_worker):
                @mqtasks_app.task
                def add(x: int, y: int) -> int:
                    return x + y

                mqtasks_start_worker()
                assert add.delay(2, 3).get(timeout=5) == 5
        """
        with contextlib.ExitStack() as stack:

            def start(**options: Any) -> Worker:
                return stack.enter_context(running_worker(mqtasks_app, **options))

            yield start

    @pytest.fixture
    def mqtasks_fake_redis_app() -> Iterator[App]:
        """A fresh app on the ``redis://`` transport and a fakeredis server of its own."""
        app = fake_redis_app()
        yield app
        reset(app)

    @pytest.fixture
    def mqtasks_fake_redis_worker(mqtasks_fake_redis_app: App) -> Iterator[Worker]:
        """A worker on ``mqtasks_fake_redis_app``, as ``mqtasks_worker`` is on ``mqtasks_app``."""
        with running_worker(mqtasks_fake_redis_app) as worker:
            yield worker
