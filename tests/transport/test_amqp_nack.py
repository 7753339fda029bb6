"""A nack is the broker's answer to one message, not a lost connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mqtasks import App, PublishNacked, QueueSpec
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.amqp.confirms import _ConfirmPipeline
from mqtasks.transport.envelope import Envelope

pytestmark = pytest.mark.integration


def _full_queue_app(make_app: Callable[..., App], amqp_url: str, name: str) -> tuple[App, Any]:
    """An app with one pooled connection and a task whose queue holds one message, full."""
    app = make_app(
        amqp_url,
        publish_pool_size=1,
        queues=[QueueSpec(name, queue_type="classic", max_length=1, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job() -> None: ...

    job.delay()  # the queue is full from now on
    return app, job


def test_a_nacked_publish_raises_after_one_attempt(
    amqp_url: str,
    make_app: Callable[..., App],
    queue_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """py-amqp lists ``MessageNacked`` among its recoverable connection errors, so
    kombu's ``ensure()`` would open a new connection and publish the message again,
    ``publish_retries`` times, without a pause: a full queue would be hammered with
    reconnects, and a later attempt could succeed where ``delay()`` must raise."""
    name = queue_name("full")
    app, job = _full_queue_app(make_app, amqp_url, name)
    attempts: list[str] = []
    original = _ConfirmPipeline.send

    def counting(
        self: _ConfirmPipeline, exchange: str, routing_key: str, envelope: Any, *rest: Any
    ) -> Any:
        attempts.append(envelope.message_id)
        return original(self, exchange, routing_key, envelope, *rest)

    monkeypatch.setattr(_ConfirmPipeline, "send", counting)
    with pytest.raises(PublishNacked) as raised:
        job.delay()
    assert attempts == [raised.value.task_id]
    assert app.transport.message_counts([app.queue(name)]) == {name: 1}


def test_a_nacked_publish_keeps_its_connection(
    amqp_url: str, make_app: Callable[..., App], queue_name: Callable[[str], str]
) -> None:
    """After a nack the connection is as good as before: the next publish uses it."""
    app, job = _full_queue_app(make_app, amqp_url, queue_name("full"))
    transport = app.transport
    assert isinstance(transport, AmqpTransport)
    before = transport._pipeline._amqp
    assert before is not None
    with pytest.raises(PublishNacked):
        job.delay()
    assert transport._pipeline._amqp is before
    assert before.connected


def test_on_a_cluster_a_bulk_publish_retries_a_nack_until_the_broker_takes_it(
    amqp_url: str, make_app: Callable[..., App], queue_name: Callable[[str], str]
) -> None:
    """A cluster nacks a quorum queue's messages while it has no leader: the bulk path,
    like ``publish()``, sends a nacked message again until its time is up. Here the
    nack comes from a queue bounded behind the transport's back (declared by another
    app), which it cannot tell from a queue between leaders."""
    name = queue_name("full")
    owner, _ = _full_queue_app(make_app, amqp_url, name)
    cluster = make_app(f"{amqp_url};{amqp_url}", publish_timeout=10.0)  # a failover list
    single = make_app(amqp_url, publish_timeout=10.0)
    envelope = Envelope(b'{"args":[],"kwargs":{}}', "bulk-1")

    # Without a failover list a nack is final at once
    [result] = single.transport.publish_many([(name, envelope)])
    assert isinstance(result, PublishNacked)

    # On a cluster it is published again until there is room
    room = threading.Timer(1.0, lambda: owner.transport.purge([owner.queue(name)]))
    room.start()
    started = time.monotonic()
    try:
        assert cluster.transport.publish_many([(name, envelope)], timeout=8.0) == [None]
    finally:
        room.join()
    assert time.monotonic() - started >= 1.0
    assert owner.transport.message_counts([owner.queue(name)]) == {name: 1}
