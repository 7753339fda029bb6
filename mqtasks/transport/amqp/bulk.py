"""Publishing many messages to RabbitMQ with pipelined confirms (``Task.map()``,
``App.send_many()``, ``app.publishing()`` blocks).

Up to :attr:`~mqtasks.transport.amqp.AmqpTransport.confirm_window` messages are
in flight on a channel of their own, written as frames by hand
(:mod:`~mqtasks.transport.amqp.wire`), and each is settled by its broker ack,
nack or return as they arrive. On a cluster, what RabbitMQ nacks for an
unbounded queue (a quorum queue between leaders) is published again until the
call's time is up, as :meth:`~mqtasks.transport.amqp.AmqpTransport.publish` does
for one message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ..._url import mask_url
from ...exceptions import PublishError, PublishNacked, Unroutable
from ..envelope import Envelope
from .confirms import Confirm, Confirms
from .wire import _PublishFrames, message_timestamp, serialize_properties

if TYPE_CHECKING:
    from . import AmqpTransport

__all__ = ["publish_many"]

logger = structlog.get_logger("mqtasks.transport")


def publish_many(
    transport: AmqpTransport, items: Sequence[tuple[str, Envelope]], timeout: float | None
) -> list[BaseException | None]:
    """Publish ``items`` (``(queue, envelope)`` pairs); return, per item, None if the
    broker has it or the error (``Unroutable``, ``PublishNacked``, ``PublishError``)."""
    if not items:
        return []
    if timeout is None:
        timeout = transport.publish_timeout * max(1.0, len(items) / transport.confirm_window)
    deadline = time.monotonic() + timeout
    results = _publish_once(transport, items, deadline)
    pause = 0.1
    while True:
        again = [
            i
            for i, result in enumerate(results)
            if isinstance(result, PublishNacked) and transport.nack_is_transient(items[i][0])
        ]
        if not again or time.monotonic() + pause >= deadline:
            return results
        # A cluster nacks what it cannot take now: a quorum queue whose leader is
        # gone nacks until its members elect another (seconds). Published again,
        # with the same ids, until the call's time is up.
        logger.info("amqp.publish_nacked_retry", messages=len(again), retry_in=pause)
        time.sleep(pause)
        pause = min(1.0, pause * 2)
        retried = _publish_once(transport, [items[i] for i in again], deadline)
        for i, result in zip(again, retried, strict=True):
            results[i] = result


def _publish_once(
    transport: AmqpTransport, items: Sequence[tuple[str, Envelope]], deadline: float
) -> list[BaseException | None]:
    """One pass of :func:`publish_many` over ``items``, on one channel."""
    published = 0  # items handed to the socket (or possibly, when a write failed)
    results: list[BaseException | None] = [None] * len(items)
    # Each item's confirm; the channel's delivery tag of item i is i + 1.
    confirms: Confirms[Confirm] = Confirms()
    sent = [Confirm() for _ in items]
    by_id = {env.message_id: i for i, (_, env) in enumerate(items)}

    def fail(index: int, exc: BaseException) -> None:
        if results[index] is None:
            results[index] = exc

    def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        index = by_id.get(message.properties.get("message_id"))
        if index is not None:
            fail(
                index,
                Unroutable(
                    f"Task {items[index][1].message_id} was NOT enqueued: no queue named "
                    f"{routing_key!r} is bound ({exc}).",
                    task_id=items[index][1].message_id,
                ),
            )

    try:
        with transport._pool().acquire(
            block=True, timeout=max(0.05, deadline - time.monotonic())
        ) as producer:
            conn = producer.connection
            conn.ensure_connection(max_retries=transport.publish_retries)
            channel = conn.channel()
            try:
                channel.events["basic_return"].add(on_return)
                confirms.select(channel)
                sock = channel.connection.transport.sock
                if sock.gettimeout() != transport.publish_timeout:
                    # Bounds a write the broker does not read (see _publish).
                    sock.settimeout(transport.publish_timeout)
                frames = _PublishFrames(channel)
                for i, (queue, env) in enumerate(items):
                    while len(confirms.pending) >= transport.confirm_window:
                        published = i
                        frames.flush()
                        transport._wait_confirms(channel.connection, deadline)
                    properties = serialize_properties(
                        env, dict(env.headers), message_timestamp(env)
                    )
                    confirms.add(sent[i])
                    frames.add("", queue, properties, env.body)
                    if len(frames.buffer) >= frames.flush_size:
                        published = i + 1
                        frames.flush()
                published = len(items)
                frames.flush()
                while confirms.pending:
                    transport._wait_confirms(channel.connection, deadline)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    except Exception as exc:
        for t in confirms.pending:
            if t > published:
                continue  # never handed to the broker: below
            env = items[t - 1][1]
            fail(
                t - 1,
                PublishError(
                    f"Task {env.message_id} was NOT confirmed ({type(exc).__name__}: {exc}); it "
                    f"may or may not be enqueued (broker {mask_url(transport.url)}). Publishing it "
                    "again with the same task id makes a duplicate detectable.",
                    task_id=env.message_id,
                ),
            )
        for i in range(published, len(items)):  # never handed to the broker
            env = items[i][1]
            fail(
                i,
                PublishError(
                    f"Task {env.message_id} was NOT enqueued: {type(exc).__name__}: {exc}",
                    task_id=env.message_id,
                ),
            )
    for i, confirm in enumerate(sent):
        if confirm.outcome == "nack":
            fail(
                i,
                PublishNacked(
                    f"Task {items[i][1].message_id} was NOT enqueued: the broker refused it.",
                    task_id=items[i][1].message_id,
                ),
            )
    if any(isinstance(r, Unroutable) for r in results):
        transport.forget_declared()
    return results
