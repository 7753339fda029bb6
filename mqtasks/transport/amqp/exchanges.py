"""Topic exchanges on RabbitMQ (events): declaring them, binding queues, emitting.

Each events exchange is a durable ``topic`` exchange; a subscriber's queue is
declared as :meth:`~mqtasks.transport.kombu.KombuTransport.declare` declares any
queue (its dead-letter queue, its queue type) and bound with ``queue.bind``.
RabbitMQ matches routing keys itself. An emit is one ``basic.publish`` to the
exchange on the confirming channel every publish uses, so it is confirmed, and
returned when ``mandatory`` and no binding matches, exactly as a publish is.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ...exceptions import PublishError
from ..base import QueueSpec
from ..envelope import Envelope
from ..errors import is_not_found, translate_errors
from ..topic import check_exchange, check_key, check_pattern

if TYPE_CHECKING:
    from . import AmqpTransport

__all__ = ["bind", "declare_exchange", "emit", "unbind"]


def declare_exchange(channel: Any, exchange: str) -> None:
    """Declare ``exchange`` as a durable topic exchange (idempotent)."""
    channel.exchange_declare(exchange=exchange, type="topic", durable=True, auto_delete=False)


@contextlib.contextmanager
def _channel(transport: AmqpTransport, what: str) -> Any:
    with translate_errors(transport.url, what), transport.connection() as conn:
        conn.ensure_connection(
            max_retries=transport.publish_retries, timeout=transport.publish_timeout
        )
        yield conn.default_channel


def bind(transport: AmqpTransport, exchange: str, pattern: str, spec: QueueSpec) -> None:
    """Declare the exchange and ``spec`` (as ``declare`` does), then bind ``spec`` under ``pattern``."""
    check_exchange(exchange)
    check_pattern(pattern)
    transport.declare([spec])
    with _channel(transport, f"bind {spec.name!r} to {exchange!r}") as channel:
        declare_exchange(channel, exchange)
        channel.queue_bind(queue=spec.name, exchange=exchange, routing_key=pattern)
    transport.exchanges_declared.add(exchange)
    with transport.bound_lock:
        transport.bound.setdefault(exchange, set()).add((pattern, spec.name))


def unbind(transport: AmqpTransport, exchange: str, pattern: str, queue: str) -> None:
    """Remove one binding; a queue or exchange that does not exist has none."""
    check_exchange(exchange)
    try:
        with _channel(transport, f"unbind {queue!r} from {exchange!r}") as channel:
            channel.queue_unbind(queue=queue, exchange=exchange, routing_key=pattern)
    except Exception as exc:
        if not is_not_found(exc):
            raise
    with transport.bound_lock:
        transport.bound.get(exchange, set()).discard((pattern, queue))


def emit(
    transport: AmqpTransport,
    exchange: str,
    routing_key: str,
    envelope: Envelope,
    mandatory: bool,
) -> int:
    """Publish once to ``exchange``, confirmed; return -1 (RabbitMQ does not say how many queues).

    The exchange is declared once per transport before its first emit, so an
    emit to an exchange nobody bound yet is unroutable (or dropped), not a
    channel error on the shared publishing channel.

    Raises:
        Unroutable: ``mandatory`` and no binding matches (the broker returned it).
        PublishError: Not confirmed (``PublishNacked`` for a nack).
    """
    check_exchange(exchange)
    check_key(routing_key)
    if exchange not in transport.exchanges_declared:
        with _channel(transport, f"declare exchange {exchange!r}") as channel:
            declare_exchange(channel, exchange)
        transport.exchanges_declared.add(exchange)
    where = f"exchange {exchange!r} (routing key {routing_key!r})"
    try:
        returned = transport._send(exchange, routing_key, envelope, None, where, mandatory)
    except PublishError:
        # The exchange may have been deleted behind our back: declare it again next time.
        transport.exchanges_declared.discard(exchange)
        raise
    if returned is not None:
        raise transport.unroutable_event(exchange, routing_key, envelope)
    return -1
