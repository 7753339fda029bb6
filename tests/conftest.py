"""Fixtures: brokers (memory, the local RabbitMQ and Redis), apps with run-unique queues."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mqtasks import App
from mqtasks.testing import FAKE_REDIS_URL, fake_redis_app
from tests._helpers.brokers import cleanup, require_broker, stop_sqs, unique_name
from tests._helpers.crash import Crash
from tests._helpers.statsd import statsd_server  # noqa: F401 - a fixture for every test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a real broker ``integration`` (``-m integration``)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("broker_url") if callspec else None
        fixtures = getattr(item, "fixturenames", ())
        if param in ("amqp", "redis") or "amqp_url" in fixtures or "redis_url" in fixtures:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _local_sqs_server() -> Iterator[None]:
    """Stop at the end of the run the moto SQS server a test may have started."""
    yield
    stop_sqs()


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
        if url == FAKE_REDIS_URL:
            app = fake_redis_app("t", **overrides)  # type: ignore[arg-type]
        else:
            app = App("t", broker=url, **overrides)  # type: ignore[arg-type]
        apps.append(app)
        return app

    yield make
    for app in apps:
        cleanup(app)


@pytest.fixture
def app(broker_url: str, make_app: Callable[..., App]) -> App:
    """An app on each transport in turn, with a run-unique default queue."""
    return make_app(broker_url)


@pytest.fixture
def crash(tmp_path: Path) -> Iterator[Callable[[str], Crash]]:
    """A factory of worker-subprocess set-ups; their workers are killed and keys deleted after."""
    made: list[Crash] = []

    def make(kind: str) -> Crash:
        made.append(Crash(kind, tmp_path))
        return made[-1]

    yield make
    for c in made:
        c.close()
