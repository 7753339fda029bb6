"""Redis on fakeredis, no server needed.

The ``redis://`` transport through :func:`mqtasks.testing.fake_redis_app` (its
Lua scripts included; its consumers poll, as fakeredis connections have no
socket to wait on), and the publishing side of kombu's Redis transport
(``redis+kombu://``). The transport contract also runs on fakeredis (see
``test_contract.py``), and ``tests/test_examples.py`` runs the docs' user-style
tests on the plugin's fakeredis fixtures.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from mqtasks import App, ConfigurationError, Retry, current_message
from mqtasks.testing import drain, fake_redis_app, reset, running_worker
from mqtasks.transport import redis_kombu as mq_redis
from mqtasks.transport.base import Delivery
from mqtasks.transport.redis import (
    RedisConsumer,
    RedisDelivery,
    RedisTransport,
)
from tests._helpers.wait import wait_for


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeServer:
    server = fakeredis.FakeServer()

    def fake_pool(self, asynchronous: bool = False) -> redis.ConnectionPool:
        return redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)

    monkeypatch.setattr(mq_redis._Channel, "_get_pool", fake_pool)
    return server


def test_a_task_lands_in_the_queue_list_in_protocol_form(server: fakeredis.FakeServer) -> None:
    app = App("fake", broker="redis+kombu://127.0.0.1:6379/0", default_queue="work")

    @app.task(name="shop.add", priority=3)
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.apply_async(args=(2,), kwargs={"y": 3}, headers={"traceparent": "00-1"})
    client = redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=fakeredis.FakeRedisConnection, server=server
        )
    )
    raw = [v for k in client.keys("work*") for v in client.lrange(k, 0, -1)]
    assert len(raw) == 1
    payload = json.loads(raw[0])
    body = payload["body"]
    if payload["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    assert json.loads(body) == {"args": [2], "kwargs": {"y": 3}}
    assert payload["content-type"] == "application/json"
    assert payload["headers"]["mqtasks-task"] == "shop.add"
    assert payload["headers"]["mqtasks-attempt"] == 1
    assert payload["headers"]["traceparent"] == "00-1"
    assert payload["properties"]["message_id"] == handle.id
    assert payload["properties"]["delivery_mode"] == 2
    assert payload["properties"]["priority"] == 6  # kombu's Redis order is reversed: 9 - 3
    assert app.transport.message_counts([app.queue("work")]) == {"work": 1}
    assert app.transport.purge([app.queue("work")]) == 1
    assert app.transport.message_counts([app.queue("work")]) == {"work": 0}
    app.close()


# -- redis:// on fakeredis ---------------------------------------------------------


@pytest.fixture
def fake_app() -> Iterator[App]:
    app = fake_redis_app(default_queue="work")
    yield app
    reset(app)


def test_a_consumer_on_fakeredis_polls_instead_of_blocking_in_blmove(
    monkeypatch: pytest.MonkeyPatch, fake_app: App
) -> None:
    """A fakeredis connection has no socket of its own: select() on it fails, or
    waits on whatever file descriptor of the process bears its made-up number."""

    def refuse(self: RedisConsumer, source: Any) -> None:
        raise AssertionError("BLMOVE sent on a fakeredis connection")

    monkeypatch.setattr(RedisConsumer, "_send_blmove", refuse)
    noop = fake_app.task(name="t.noop")(_noop)
    got: list[Delivery] = []
    consumer = fake_app.transport.consumer([fake_app.queue("work")], prefetch=1)
    consumer.start(got.append)
    try:
        # Given a consumer that waited on an empty queue
        consumer.wait(0.05, -1)
        # When a message is sent
        noop.delay()

        # Then a later wait finds it
        def delivered() -> list[Delivery]:
            consumer.wait(0.05, -1)
            return got

        wait_for(delivered, "the delivery")
        assert [d.headers["mqtasks-task"] for d in got] == ["t.noop"]
    finally:
        consumer.close()


def test_a_retry_is_held_in_the_delayed_sorted_set_until_due(fake_app: App) -> None:
    attempts: list[int] = []

    @fake_app.task
    def settle() -> None:
        message = current_message()
        assert message is not None
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise Retry(countdown=3600)

    transport = fake_app.transport
    assert isinstance(transport, RedisTransport)
    client = transport.publisher()  # it talks to the app's fake server
    delayed = transport.delayed_key("work")
    with running_worker(fake_app) as worker:
        # When the first attempt asks for a retry in an hour
        settle.delay()
        [(element, due_ms)] = wait_for(
            lambda: client.zrange(delayed, 0, -1, withscores=True), "the held retry"
        )
        # Then Redis holds the second attempt in the queue's delayed set, due in an hour
        seconds, micros = client.time()
        assert due_ms > seconds * 1000 + micros / 1000 + 3000 * 1000
        held = RedisDelivery(element, "work", 0, "", "")
        assert held.headers["mqtasks-attempt"] == 2
        assert client.llen(transport.queue_key("work")) == 0
        # When it falls due (moved to now, as the clock cannot be)
        client.zadd(delayed, {element: 0}, xx=True)
        drain(worker)
    # Then the worker moves it to the queue and runs it
    assert attempts == [1, 2]
    assert client.zcard(delayed) == 0


def test_a_task_out_of_retries_lands_in_the_dead_letter_list(fake_app: App) -> None:
    @fake_app.task(max_retries=1, retry_backoff=0)
    def doomed() -> None:
        raise RuntimeError("always")

    handle = doomed.delay()
    with running_worker(fake_app) as worker, pytest.raises(RuntimeError, match="always"):
        drain(worker)
    [dead] = fake_app.dead_letters("work")
    assert (dead.id, dead.reason, dead.attempts) == (handle.id, "max_retries_exceeded", 2)
    transport = fake_app.transport
    assert isinstance(transport, RedisTransport)
    client = transport.publisher()
    assert client.llen(transport.queue_key("work.dlq")) == 1
    assert client.llen(transport.queue_key("work")) == 0


def test_each_fake_redis_app_has_its_own_server_unless_one_is_shared() -> None:
    fake_server = fakeredis.FakeServer()
    apps = [
        fake_redis_app(default_queue="work"),
        fake_redis_app(default_queue="work", server=fake_server),
        fake_redis_app(default_queue="work", server=fake_server),
    ]
    try:
        noops = [app.task(name="t.noop")(_noop) for app in apps]
        noops[1].delay()
        counts = [a.transport.message_counts([a.queue("work")])["work"] for a in apps]
        assert counts == [0, 1, 1]
    finally:
        for app in apps:
            reset(app)


def _noop() -> None: ...


def test_fake_redis_app_keeps_the_transport_options_given() -> None:
    app = fake_redis_app(transport_options={"key_prefix": "{mine}", "delay_poll_interval": 0.5})
    try:
        transport = app.transport
        assert isinstance(transport, RedisTransport)
        assert (transport.key_prefix, transport.delay_poll_interval) == ("{mine}", 0.5)
        assert transport.connection_class is not None
    finally:
        reset(app)


def test_fake_redis_app_refuses_a_broker() -> None:
    with pytest.raises(TypeError, match="sets the broker itself"):
        fake_redis_app(broker="redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("missing", ["fakeredis", "lupa"])
def test_fake_redis_app_without_its_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    if missing == "fakeredis":
        monkeypatch.setitem(sys.modules, "fakeredis", None)  # import fails
    else:
        find_spec = importlib.util.find_spec

        def without_lupa(name: str, *args: Any) -> Any:
            return None if name == "lupa" else find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", without_lupa)
    with pytest.raises(ConfigurationError, match=r"pip install 'mqtasks\[testing\]'"):
        fake_redis_app()


@pytest.mark.parametrize(
    ("url", "connection_class"),
    [
        ("redis://127.0.0.1:6379/0", "fakeredis.FakeRedisConnection"),
        ("redis://127.0.0.1:6379/0", dict),
        ("rediss://127.0.0.1:6379/0", fakeredis.FakeRedisConnection),
    ],
)
def test_connection_class_must_be_a_redis_connection_class_without_tls(
    url: str, connection_class: Any
) -> None:
    with pytest.raises(ConfigurationError, match="connection_class"):
        RedisTransport(url, transport_options={"connection_class": connection_class})
