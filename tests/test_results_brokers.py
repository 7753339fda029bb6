"""Results on the real brokers (RabbitMQ, Redis) with the real result backends (Redis,
PostgreSQL), each test under a key prefix or table prefix of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mqtasks import App, TaskFailed, current_message
from mqtasks.result import DEAD_LETTERED, PENDING, RETRYING, SUCCEEDED
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests.backend.conftest import drop_tables, postgres_url, table_prefix

pytestmark = pytest.mark.integration


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest) -> str:
    """The local RabbitMQ, then the local Redis."""
    return require_broker(request.param)


@pytest.fixture(params=["redis", "postgresql"])
def backend_options(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """App arguments for the local Redis, then the local PostgreSQL, as result backend;
    the test's keys or tables are deleted after it."""
    if request.param == "redis":
        require_broker("redis")
        prefix = unique_name("results") + ":"
        yield {"backend": REDIS_URL, "backend_key_prefix": prefix}
        delete_keys(prefix)
    else:
        prefix = table_prefix()
        yield {"backend": postgres_url(prefix)}
        drop_tables(prefix)


@pytest.fixture
def app(
    broker: str, backend_options: dict[str, Any], make_app: Callable[..., App]
) -> Iterator[App]:
    """An app on each broker with each backend; its connections closed before cleanup."""
    app = make_app(broker, **backend_options)
    yield app
    app.close()


def test_get_returns_the_value_stored_by_the_worker(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(20, 22)
    assert handle.state == PENDING
    with running_worker(app):
        assert handle.get(timeout=20) == 42
    assert handle.state == SUCCEEDED
    assert app.handle(handle.id).result == 42


def test_a_waiting_get_is_woken_by_the_stored_result(app: App) -> None:
    @app.task
    def echo(text: str) -> str:
        return text

    handle = echo.delay("hello")
    got: list[Any] = []
    # Given a get() already waiting when the worker starts
    waiter = threading.Thread(target=lambda: got.append(handle.get(timeout=30)))
    waiter.start()
    with running_worker(app):
        waiter.join(30)
    assert got == ["hello"]


def test_task_failed_after_retries_carries_reason_type_message_traceback(app: App) -> None:
    seen: list[str] = []

    @app.task(max_retries=1, retry_backoff=0.3)  # RETRYING is stored after the publish
    def broken() -> None:
        message = current_message()
        assert message is not None
        seen.append(app.handle(message.id).state)
        raise RuntimeError(f"attempt {message.attempt} failed")

    handle = broken.delay()
    with running_worker(app) as worker:
        with pytest.raises(TaskFailed) as info:
            handle.get(timeout=30)
        drain(worker, timeout=30, raise_errors=False)
    error = info.value
    assert (error.state, error.reason, error.exc_type) == (
        DEAD_LETTERED,
        "max_retries_exceeded",
        "RuntimeError",
    )
    assert error.exc_message == "attempt 2 failed"
    assert error.traceback and "RuntimeError: attempt 2 failed" in error.traceback
    assert seen == [PENDING, RETRYING]


def test_the_first_outcome_wins_when_a_message_runs_twice(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    task_id = unique_name("twice")
    with running_worker(app, concurrency=1) as worker:
        add.apply_async((1, 1), task_id=task_id)
        assert app.handle(task_id).get(timeout=20) == 2
        add.apply_async((5, 5), task_id=task_id)
        drain(worker, timeout=30)
    assert app.handle(task_id).get(timeout=5) == 2
