"""A nack is the broker's answer to one message, not a lost connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mqtasks import App, PublishNacked, QueueSpec
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.amqp.confirms import _ConfirmPipeline

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
