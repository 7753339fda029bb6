"""The consuming side of the kombu-backed transports: one connection per worker,
owned by the thread that drains it, with reconnects and heartbeats."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import kombu
import structlog

from .._url import mask_url
from ..exceptions import TransportError
from .base import Consumer, Delivery, QueueSpec
from .errors import translate_errors

if TYPE_CHECKING:
    from kombu.message import Message as KombuMessage

    from .kombu import KombuTransport

__all__ = ["KombuConsumer", "KombuDelivery"]

logger = structlog.get_logger("mqtasks.transport")


class KombuDelivery(Delivery):
    """A delivery read from a kombu message, which settles it."""

    __slots__ = ("raw",)

    def __init__(
        self, raw: KombuMessage, queue: str, generation: int, delivery_count: int | None = None
    ) -> None:
        props = raw.properties
        super().__init__(
            raw.body if isinstance(raw.body, bytes) else bytes(raw.body or b""),
            queue,
            generation,
            headers=raw.headers or {},
            message_id=props.get("message_id"),
            content_type=raw.content_type,
            content_encoding=raw.content_encoding,
            priority=props.get("priority"),
            redelivered=bool(raw.delivery_info.get("redelivered")),
            delivery_count=delivery_count,
            refused=getattr(raw, "mqtasks_refused", None),
        )
        self.raw = raw


class KombuConsumer(Consumer):
    """Receives deliveries from queues over one kombu connection owned by one thread.

    Every method must be called from the thread that drains the connection.
    After a reconnect, deliveries of the old connection are stale: settling
    them is skipped (the broker has already requeued them).

    Args:
        transport: The transport the consumer belongs to.
        specs: Queues to consume.
        prefetch: Most unacknowledged deliveries held at once.
    """

    transport: KombuTransport

    def __init__(
        self, transport: KombuTransport, specs: Sequence[QueueSpec], *, prefetch: int
    ) -> None:
        super().__init__(transport, specs, prefetch=prefetch)
        self._conn: kombu.Connection | None = None
        self._consumer: kombu.Consumer | None = None
        self._tags: dict[Any, str] = {}

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Connect, declare the queues and start consuming.

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        self._on_delivery = on_delivery
        self._connect(max_retries=self.transport.publish_retries)

    def _connect(self, max_retries: int | None) -> None:
        t = self.transport
        # The queues with their dead-letter queues and bindings: a worker must be able
        # to dead-letter what it takes even if no publisher ever declared them.
        t.forget_declared()
        t.declare(self.specs)
        conn = t.connection(heartbeat=t.heartbeat)
        with translate_errors(t.url, "connect consumer"):
            conn.ensure_connection(
                max_retries=max_retries,
                interval_start=0.2,
                interval_step=0.5,
                interval_max=5.0,
                errback=self._log_connect_error,
            )
            channel = conn.channel()
            queues = [t.kombu_queue(s).bind(channel) for s in self.specs]
            for q in queues:
                q.declare()
            self._consumer = kombu.Consumer(
                channel, queues=queues, no_ack=False, auto_declare=False
            )
            # Deliveries may arrive while consuming starts (a synchronous qos or
            # consume): they belong to the new connection.
            self.generation += 1
            self._consume(self._consumer)
            self._tags = {tag: name for name, tag in self._consumer._active_tags.items()}
        self._conn = conn
        self._cancelled = False

    def _consume(self, consumer: kombu.Consumer) -> None:
        """Set the prefetch window and start consuming every queue of ``consumer``."""
        consumer.qos(prefetch_count=self.prefetch)
        consumer.on_message = self._receive
        consumer.consume()

    def _prefetch_changed(self) -> None:
        """Set the new window on the channel: kombu's virtual channels (``memory://``,
        ``redis+kombu://``) check it at each delivery."""
        consumer = self._consumer
        if consumer is None:
            return  # the reconnect sets it
        try:
            consumer.qos(prefetch_count=self.prefetch)
        except self.connection_errors as exc:
            self._lost(exc)

    def _log_connect_error(self, exc: BaseException, interval: float) -> None:
        logger.warning(
            "broker.connect_failed",
            url=mask_url(self.transport.url),
            error=type(exc).__name__,
            retry_in=round(interval, 2),
        )

    def _receive(self, raw: KombuMessage) -> None:
        info = raw.delivery_info
        queue = self._tags.get(info.get("consumer_tag")) or info.get("routing_key") or ""
        assert self._on_delivery is not None
        count = self.transport.delivery_count(raw)
        self._on_delivery(KombuDelivery(raw, queue, self.generation, count))

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean the connection is gone."""
        conn = self._conn or self.transport.connection()
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them.

        Reconnects (forever, with capped backoff) when the connection is lost.
        """
        if self._conn is None:
            self._reconnect()
            return
        try:
            self._conn.drain_events(timeout=timeout)
        except TimeoutError:
            pass
        except self.connection_errors as exc:
            self._lost(exc)
            return
        self.heartbeat_check()

    def _lost(self, exc: BaseException) -> None:
        logger.warning(
            "broker.connection_lost", url=mask_url(self.transport.url), error=type(exc).__name__
        )
        self._reconnect()

    def heartbeat_check(self) -> None:
        """Send and check heartbeats; reconnect if the broker went silent."""
        if self._conn is None or not self.transport.heartbeat:
            return
        try:
            self._conn.heartbeat_check()
        except self.connection_errors as exc:
            logger.warning("broker.heartbeat_missed", error=type(exc).__name__)
            self._reconnect()

    def _reconnect(self) -> None:
        self._drop()
        delay = 0.2
        # One attempt at a time rather than kombu's retry-forever, so that a
        # stopping worker is not held hostage by a broker that stays down.
        while not (self._cancelled or self._interrupted.is_set()):
            try:
                self._connect(max_retries=0)
            except TransportError as exc:
                logger.warning("broker.reconnect_failed", error=str(exc), retry_in=delay)
                self._interrupted.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            logger.info("broker.reconnected", url=mask_url(self.transport.url))
            return

    def _drop(self) -> None:
        conn, self._conn, self._consumer = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    def _settle(self, delivery: Any, action: Callable[[], None]) -> bool:
        if delivery.generation != self.generation or self._conn is None:
            return False  # stale: the broker requeued it when the old connection died
        try:
            action()
        except self.connection_errors as exc:
            logger.warning("broker.settle_failed", error=type(exc).__name__)
            self._reconnect()
            return False
        return True

    def ack(self, delivery: Any) -> bool:
        """Acknowledge: the message is done. Returns False if it was stale."""
        return self._settle(delivery, delivery.raw.ack)

    def reject(self, delivery: Any) -> bool:
        """Reject without requeue (the broker drops or dead-letters it)."""
        return self._settle(delivery, lambda: delivery.raw.reject(requeue=False))

    def requeue(self, delivery: Any) -> bool:
        """Hand the message back to the broker for another consumer."""
        return self._settle(delivery, lambda: delivery.raw.reject(requeue=True))

    def cancel(self) -> None:
        """Stop receiving new deliveries (basic.cancel); held ones stay settleable."""
        self._cancelled = True
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.cancel()

    def close(self) -> None:
        """Close the connection; unacknowledged deliveries go back to the broker."""
        self._cancelled = True
        conn, self._conn, self._consumer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # the connection may already be gone
                with contextlib.suppress(Exception):
                    conn.collect()
