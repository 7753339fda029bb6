"""Fixtures: brokers (memory, the local RabbitMQ and Redis), apps with run-unique queues."""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from mqtasks import App
from mqtasks.testing import reset
from mqtasks.transport.base import DLQ_SUFFIX

if TYPE_CHECKING:
    from tests.transport.test_delivery_limit import Crash

#: The local RabbitMQ used by integration tests.
AMQP_URL = os.environ.get("MQTASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The local Redis used by integration tests (a database of its own).
REDIS_URL = os.environ.get("MQTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

BROKERS = {"memory": "memory://", "amqp": AMQP_URL, "redis": REDIS_URL}

#: Unique per test run, so runs sharing a broker never see each other's queues.
RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count()


def unique_name(prefix: str = "q") -> str:
    """Return a queue name no other test run uses."""
    return f"mqt-{RUN_ID}-{prefix}-{next(_counter)}"


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


def require_broker(kind: str) -> str:
    """Return the URL of broker ``kind``; skip if unreachable, but fail under CI."""
    url = BROKERS[kind]
    if kind != "memory" and not _reachable(url):
        message = f"{kind} broker not reachable at {urlsplit(url).hostname}:{urlsplit(url).port}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires the real brokers", pytrace=False)
        pytest.skip(message)
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a real broker ``integration`` (``-m integration``)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("broker_url") if callspec else None
        fixtures = getattr(item, "fixturenames", ())
        if param in ("amqp", "redis") or "amqp_url" in fixtures or "redis_url" in fixtures:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(params=["memory", "amqp", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each transport in turn: memory, the local RabbitMQ, the local Redis."""
    return require_broker(request.param)


@pytest.fixture
def amqp_url() -> str:
    """The local RabbitMQ."""
    return require_broker("amqp")


@pytest.fixture
def redis_url() -> str:
    """The local Redis."""
    return require_broker("redis")


@pytest.fixture
def queue_name() -> Callable[[str], str]:
    """A factory of run-unique queue names."""
    return unique_name


@pytest.fixture
def make_app() -> Iterator[Callable[..., App]]:
    """A factory of apps whose default queue is run-unique; queues deleted at teardown."""
    apps: list[App] = []

    def make(url: str = "memory://", **overrides: object) -> App:
        overrides.setdefault("default_queue", unique_name("default"))
        overrides.setdefault("publish_timeout", 5.0)
        app = App("t", broker=url, **overrides)  # type: ignore[arg-type]
        apps.append(app)
        return app

    yield make
    for app in apps:
        cleanup(app)


def cleanup(app: App) -> None:
    """Delete every queue the app used (its tasks' and configured ones), then reset it."""
    names = set(app.task_queues()) | set(app.queues) | set(app.transport._declared)
    names = {n for n in names if n.startswith(f"mqt-{RUN_ID}")}
    # Dead-letter queues too: a transport may create them without declaring them.
    names |= {n + DLQ_SUFFIX for n in names if not n.endswith(DLQ_SUFFIX)}
    if names and not app.settings.broker_url.startswith("memory"):
        try:
            app.transport.delete([app.queue(n) for n in names])
        except Exception:  # best effort: the test may have broken the connection on purpose
            pass
    reset(app)


@pytest.fixture
def app(broker_url: str, make_app: Callable[..., App]) -> App:
    """An app on each transport in turn, with a run-unique default queue."""
    return make_app(broker_url)


@pytest.fixture
def crash(tmp_path: Path) -> Iterator[Callable[[str], Crash]]:
    """A factory of worker-subprocess set-ups; their workers are killed and keys deleted after."""
    from tests.transport.test_delivery_limit import Crash

    made: list[Crash] = []

    def make(kind: str) -> Crash:
        made.append(Crash(kind, tmp_path))
        return made[-1]

    yield make
    for c in made:
        c.close()
