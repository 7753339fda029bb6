"""kombu's Redis transport (redis+kombu://), publishing side, on fakeredis: no server needed.

fakeredis runs in process; the blocking consume path needs a real socket, so
consuming is covered by the integration tests on the local Redis.
"""

from __future__ import annotations

import base64
import json

import fakeredis
import pytest
import redis

from mqtasks import App
from mqtasks.transport import redis_kombu as mq_redis


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeServer:
    server = fakeredis.FakeServer()

    def fake_pool(self, asynchronous: bool = False) -> redis.ConnectionPool:
        return redis.ConnectionPool(connection_class=fakeredis.FakeConnection, server=server)  # type: ignore[arg-type]

    monkeypatch.setattr(mq_redis._Channel, "_get_pool", fake_pool)
    return server


def test_a_task_lands_in_the_queue_list_in_protocol_form(server: fakeredis.FakeServer) -> None:
    app = App("fake", broker="redis+kombu://127.0.0.1:6379/0", default_queue="work")

    @app.task(name="shop.add", priority=3)
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.apply_async(args=(2,), kwargs={"y": 3}, headers={"traceparent": "00-1"})
    client = fakeredis.FakeRedis(server=server)
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
