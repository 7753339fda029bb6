"""Unique tasks (publish side: idempotency_key, unique_for) and idempotent consumers
(idempotent=True), with the real worker on memory://, and on RabbitMQ and Redis with
the Redis result backend."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from mqtasks import App, QueueSpec
from mqtasks.exceptions import BulkPublishError, ConfigurationError, EncodeError, PublishError
from mqtasks.middleware import Idempotency
from mqtasks.middleware.idempotency import done_key
from mqtasks.testing import drain, running_worker
from mqtasks.unique import KEY_PREFIX, explicit_key
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests._helpers.servers import start_redis, stop
from tests._helpers.wait import wait_for


@pytest.fixture
def app(make_app: Callable[..., App]) -> App:
    """An app on memory:// with a memory:// result backend."""
    return make_app("memory://", backend="memory://")


def ready(app: App, queue: str | None = None) -> int:
    """Messages waiting in ``queue`` (the app's default queue)."""
    name = queue or app.settings.default_queue
    return app.transport.message_counts([QueueSpec(name)])[name]


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- publish side: idempotency_key -------------------------------------------------


def test_a_second_publish_with_the_same_idempotency_key_returns_the_first_id(app: App) -> None:
    runs: list[int] = []

    @app.task
    def charge(order: int) -> None:
        runs.append(order)

    first = charge.apply_async((42,), idempotency_key="charge-42")
    with structlog.testing.capture_logs() as logs:
        second = charge.apply_async((43,), idempotency_key="charge-42")
    assert not first.duplicate
    assert second.duplicate and second.id == first.id
    assert ready(app) == 1  # nothing enqueued the second time
    [event] = events(logs, "task.duplicate_publish")
    assert event["log_level"] == "info"
    assert event["key"] == explicit_key(charge.name, "charge-42")
    assert event["task_id"] == first.id
    # Neither the arguments nor the raw key are logged (the id and the key's
    # hash are hex, which may hold "43" by chance: they are checked above).
    logged = [str(v) for k, v in event.items() if k not in ("task_id", "key")]
    assert not any("43" in v or "charge-42" in v for v in logged)
    with running_worker(app) as worker:
        drain(worker)
    assert runs == [42]


def test_an_idempotency_key_is_scoped_to_its_task(app: App) -> None:
    @app.task
    def charge(order: int) -> None: ...

    @app.task
    def refund(order: int) -> None: ...

    a = charge.apply_async((1,), idempotency_key="order-1")
    b = refund.apply_async((1,), idempotency_key="order-1")
    assert a.id != b.id and not b.duplicate
    assert ready(app) == 2


def test_the_idempotency_key_holds_for_result_expires_unless_unique_for_is_set(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://", result_expires=0.3)

    @app.task
    def charge(order: int) -> None: ...

    first = charge.apply_async((1,), idempotency_key="k")
    key = KEY_PREFIX + explicit_key(charge.name, "k")
    assert app.backend.get(key) == first.id.encode()
    # When the window (result_expires) is over, the same key publishes again
    wait_for(lambda: app.backend.get(key) is None, "the key to expire")
    again = charge.apply_async((1,), idempotency_key="k")
    assert not again.duplicate and again.id != first.id
    assert ready(app) == 2


def test_aapply_async_with_the_same_idempotency_key_publishes_once(app: App) -> None:
    @app.task
    def charge(order: int) -> None: ...

    async def send_twice() -> tuple[str, str, bool]:
        a = await charge.aapply_async((1,), idempotency_key="async-1")
        b = await charge.aapply_async((1,), idempotency_key="async-1")
        return a.id, b.id, b.duplicate

    first, second, duplicate = asyncio.run(send_twice())
    assert duplicate and first == second
    assert ready(app) == 1


# -- publish side: unique_for ------------------------------------------------------


def test_unique_for_publishes_one_message_per_distinct_arguments(app: App) -> None:
    runs: list[tuple[int, int]] = []

    @app.task(unique_for=60)
    def add(x: int, y: int) -> int:
        runs.append((x, y))
        return x + y

    first = add.delay(1, 2)
    same = add.delay(1, 2)
    by_name = add.apply_async(kwargs={"y": 2, "x": 1})
    other = add.delay(2, 3)
    assert same.id == first.id and by_name.id == first.id
    assert same.duplicate and by_name.duplicate
    assert other.id != first.id and not other.duplicate
    assert ready(app) == 2
    with running_worker(app) as worker:
        drain(worker)
    assert sorted(runs) == [(1, 2), (2, 3)]


def test_the_end_of_the_unique_for_window_lets_the_same_call_through(app: App) -> None:
    from datetime import timedelta

    @app.task(unique_for=timedelta(milliseconds=300))
    def ping(n: int) -> None: ...

    first = ping.delay(1)
    assert ping.delay(1).duplicate
    wait_for(lambda: not ping.delay(1).duplicate, "the unique_for window to end")
    assert ready(app) == 2
    assert first.id  # the first message is still there, the second is new


def test_an_unencodable_call_claims_no_key(app: App) -> None:
    @app.task(unique_for=60)
    def store(data: Any) -> None: ...

    with pytest.raises(EncodeError):
        store.delay({"when": object()})
    with pytest.raises(EncodeError):
        store.apply_async(("x" * (app.settings.max_message_size + 1),), idempotency_key="big")
    # Neither call holds a key: the same key and a valid call are enqueued
    assert not store.apply_async(("small",), idempotency_key="big").duplicate
    assert ready(app) == 1


def test_map_and_starmap_refuse_uniqueness(app: App) -> None:
    @app.task(unique_for=60)
    def unique(n: int) -> None: ...

    @app.task
    def plain(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="apply_async"):
        unique.map([1, 2])
    with pytest.raises(TypeError, match="idempotency_key"):
        plain.map([1, 2], idempotency_key="k")
    assert ready(app) == 0


def test_a_publishing_block_checks_each_call(app: App) -> None:
    @app.task(unique_for=60)
    def add(x: int, y: int) -> int:
        return x + y

    with app.publishing():
        first = add.delay(1, 2)
        second = add.delay(1, 2)
        third = add.apply_async((5, 6), idempotency_key="k")
    assert second.duplicate and second.id == first.id
    assert first.confirmed and third.confirmed
    assert ready(app) == 2


# -- publish side: a publish that fails gives the key back --------------------------


@pytest.fixture
def stopped_redis(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], int, Path]]:
    """A redis-server of this test's own, stopped: ([processes], its port, its directory)."""
    proc, port = start_redis(tmp_path)
    stop(proc)
    procs: list[subprocess.Popen[bytes]] = []
    yield procs, port, tmp_path
    for p in procs:
        stop(p)


def test_a_failed_publish_gives_the_key_back(
    stopped_redis: tuple[list[subprocess.Popen[bytes]], int, Path],
    make_app: Callable[..., App],
) -> None:
    procs, port, directory = stopped_redis
    app = make_app(
        f"redis://127.0.0.1:{port}/0",
        backend="memory://",
        publish_retries=0,
        connect_timeout=1.0,
        publish_timeout=2.0,
    )

    @app.task(unique_for=60)
    def charge(order: int) -> None: ...

    # Given a broker that is down: the publish fails
    with pytest.raises(PublishError):
        charge.delay(7)
    with pytest.raises(PublishError):
        charge.apply_async((8,), idempotency_key="charge-8")
    with pytest.raises(BulkPublishError), app.publishing():
        charge.delay(9)
    # When the broker is back, calling again enqueues each call
    proc, _ = start_redis(directory, port=port)
    procs.append(proc)
    handles = [
        charge.delay(7),
        charge.apply_async((8,), idempotency_key="charge-8"),
        charge.delay(9),
    ]
    assert not any(h.duplicate for h in handles)
    assert ready(app) == 3
    assert charge.delay(7).duplicate  # and the keys hold again


# -- consume side: idempotent=True ---------------------------------------------------


def test_an_idempotent_task_delivered_twice_runs_once(app: App) -> None:
    app.middleware.append(Idempotency())
    runs: list[int] = []

    @app.task(idempotent=True)
    def charge(order: int) -> None:
        runs.append(order)

    # Given the same message (same id) published twice
    charge.apply_async((1,), task_id="charge-1")
    charge.apply_async((1,), task_id="charge-1")
    assert ready(app) == 2
    with structlog.testing.capture_logs() as logs, running_worker(app, concurrency=1) as worker:
        drain(worker)
    # Then it ran once, and the other delivery was acknowledged unrun
    assert runs == [1]
    assert ready(app) == 0
    [skipped] = events(logs, "task.duplicate_skipped")
    assert skipped["task_id"] == "charge-1"
    assert app.backend.get(done_key("charge-1")) == b"1"


def test_a_task_without_idempotent_runs_for_every_delivery(app: App) -> None:
    app.middleware.append(Idempotency())
    runs: list[int] = []

    @app.task
    def charge(order: int) -> None:
        runs.append(order)

    charge.apply_async((1,), task_id="charge-1")
    charge.apply_async((1,), task_id="charge-1")
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert runs == [1, 1]
    assert app.backend.get(done_key("charge-1")) is None


def test_an_idempotent_task_that_fails_is_not_recorded_and_its_retry_runs(app: App) -> None:
    app.middleware.append(Idempotency())
    runs: list[int] = []

    @app.task(idempotent=True, max_retries=2, retry_backoff=0)
    def flaky(n: int) -> None:
        runs.append(n)
        if len(runs) == 1:
            raise RuntimeError("first attempt fails")

    flaky.apply_async((1,), task_id="flaky-1")
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
    assert runs == [1, 1]
    assert app.backend.get(done_key("flaky-1")) == b"1"


@pytest.mark.integration
def test_an_idempotent_task_is_deferred_while_the_backend_is_down(
    tmp_path: Path, make_app: Callable[..., App]
) -> None:
    """Neither run unchecked nor acknowledged: deferred until the backend answers."""
    proc, port = start_redis(tmp_path)
    procs = [proc]
    try:
        app = make_app(
            "memory://",
            backend=f"redis://127.0.0.1:{port}/0",
            middleware=[Idempotency(defer_delay=0.1, max_defer_delay=0.3)],
        )
        runs: list[int] = []

        @app.task(idempotent=True)
        def charge(order: int) -> None:
            runs.append(order)

        with structlog.testing.capture_logs() as logs, running_worker(app, concurrency=1) as w:
            # Given a worker that started with its backend up, then the backend stops
            stop(procs[0])
            charge.apply_async((1,), task_id="charge-down-1")
            # Then the task is not run but deferred, again and again
            wait_for(
                lambda: len(events(logs, "task.idempotency_failed")) >= 2,
                "the message to be deferred twice",
            )
            assert runs == []
            assert events(logs, "task.idempotency_failed")[0]["reason"] == "done_check_failed"
            # When the backend is back, it runs once, and a second copy is skipped
            procs.append(start_redis(tmp_path, port=port)[0])
            wait_for(lambda: runs == [1], "the deferred task to run")
            drain(w)
            charge.apply_async((1,), task_id="charge-down-1")
            drain(w)
        assert runs == [1]
        assert events(logs, "task.duplicate_skipped")
        app.close()
    finally:
        for p in procs:
            stop(p)


def test_an_idempotent_task_runs_once_with_the_workers_default_stack(app: App) -> None:
    """The worker installs Idempotency itself when the app has a result backend."""
    runs: list[int] = []

    @app.task(idempotent=True)
    def charge(order: int) -> None:
        runs.append(order)

    charge.apply_async((1,), task_id="charge-default-1")
    charge.apply_async((1,), task_id="charge-default-1")
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert runs == [1]


# -- no backend ----------------------------------------------------------------------


def test_uniqueness_and_idempotency_without_a_backend_are_configuration_errors(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend=None)
    assert not app.has_backend
    with pytest.raises(ConfigurationError, match="backend='redis://"):

        @app.task(unique_for=60)
        def unique(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="MQTASKS_BACKEND_URL"):

        @app.task(idempotent=True)
        def idempotent(n: int) -> None: ...

    @app.task
    def plain(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="has none"):
        plain.apply_async((1,), idempotency_key="k")
    assert ready(app) == 0


def test_unique_for_must_be_positive(app: App) -> None:
    with pytest.raises(ConfigurationError, match="positive"):

        @app.task(unique_for=0)
        def zero(n: int) -> None: ...


# -- the real brokers with the Redis backend -----------------------------------------


@pytest.fixture(params=["amqp", "redis"])
def broker_app(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Iterator[App]:
    """An app on the local RabbitMQ, then the local Redis, with the Redis result backend
    under a key prefix of its own (deleted after)."""
    url = require_broker(request.param)
    require_broker("redis")
    prefix = unique_name("unique") + ":"
    app = make_app(url, backend=REDIS_URL, backend_key_prefix=prefix)
    app.middleware.append(Idempotency())
    yield app
    app.close()
    delete_keys(prefix)


@pytest.mark.integration
def test_uniqueness_and_idempotency_on_a_real_broker(broker_app: App) -> None:
    app = broker_app
    runs: list[str] = []

    @app.task(idempotent=True)
    def charge(order: str) -> str:
        runs.append(order)
        return order

    @app.task(unique_for=60)
    def report(day: str) -> None:
        runs.append(day)

    # Publish side: the second call with the key, and the same unique call, enqueue nothing
    first = charge.apply_async(("a",), idempotency_key="charge-a")
    assert charge.apply_async(("a",), idempotency_key="charge-a").id == first.id
    assert report.delay("mon").id == report.delay("mon").id
    assert ready(app) == 2
    # Consume side: the same message id published twice runs once
    charge.apply_async(("b",), task_id=f"{first.id}-b")
    charge.apply_async(("b",), task_id=f"{first.id}-b")
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
        assert first.get(timeout=20) == "a"
    assert sorted(runs) == ["a", "b", "mon"]
