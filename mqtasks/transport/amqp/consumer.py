"""The RabbitMQ consumer: one connection read by the worker's I/O thread, acks written directly.

It reads the socket itself (see :mod:`~mqtasks.transport.amqp.wire`) so the
I/O thread sleeps in one ``select()`` on the socket and the worker's wake-up
pipe, acknowledges many deliveries with one ``multiple`` ack where it can, and
counts the deliveries of classic queues (see
:mod:`~mqtasks.transport.amqp.delivery_count`).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..base import Delivery
from ..kombu_consumer import KombuConsumer
from .delivery_count import RedeliveryCounter, counted_returns
from .wire import READ_SIZE, read_available, write_ack

__all__ = ["AmqpConsumer"]


def _ack(raw: Any) -> None:
    """Acknowledge a received kombu message as ``Message.ack()`` does, with :func:`write_ack`."""
    if raw.acknowledged:
        raise raw.MessageStateError(f"Message already acknowledged with state: {raw._state}")
    write_ack(raw.channel, raw.delivery_tag, False)
    raw._state = "ACK"


class AmqpConsumer(KombuConsumer):
    """Consumer that sleeps in ``select()`` on its socket and a wake-up pipe.

    kombu's ``drain_events(timeout)`` sets and restores the socket timeout on
    every call, and cannot be interrupted when a worker thread has an ack to
    send. Selecting on the socket and the worker's pipe instead wakes the I/O
    thread the moment either has something, and reads with no timeout juggling.

    On plain TCP it also reads whatever the socket holds in one ``recv()`` and
    splits the frames itself (:func:`~mqtasks.transport.amqp.wire.split_frames`):
    py-amqp reads each frame with three ``recv()`` calls (header, payload, end
    octet), where one call per wake-up serves every message that arrived.
    """

    wakeable: ClassVar[bool] = True
    #: Most messages read in one wake-up before settlements are flushed again (TLS).
    batch: ClassVar[int] = 64
    #: Bytes asked of the socket per read.
    read_size: ClassVar[int] = READ_SIZE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags received on the current channel and not settled yet.
        self._unsettled: set[int] = set()
        self._next_heartbeat = 0.0
        # Classic queues only flag a redelivery; their deliveries are counted here.
        default = self.transport.queue_type
        classic = [s for s in self.specs if (s.queue_type or default) == "classic"]
        self._counter = RedeliveryCounter(self.transport, classic)
        self._hand_on: Callable[[Delivery], None] | None = None

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._hand_on = on_delivery
        super().start(self._count if self._counter.queues else on_delivery)

    def _count(self, delivery: Delivery) -> None:
        assert self._hand_on is not None
        if self._counter.receive(delivery):
            self._hand_on(delivery)

    def _recount(self) -> None:
        """Count the redeliveries held back by :meth:`_count`: republish each with its
        count raised, then ack it (see :mod:`~mqtasks.transport.amqp.delivery_count`).

        Runs after a read, not inside the frame callback that delivered them, so
        an ack that finds the connection gone reconnects between reads. After one
        failed publish the rest go on with the count they have at least, so a
        broker that does not answer holds the I/O thread for one publish
        timeout, not one per message.
        """
        assert self._hand_on is not None
        pending, self._counter.pending = self._counter.pending, []
        failed = False
        for delivery, copy in pending:
            if delivery.generation != self.generation:
                continue  # its connection is gone: the broker has it back
            if not failed and self._counter.republish(delivery, copy):
                self.ack(delivery)
                continue
            failed = True
            delivery.delivery_count = counted_returns(copy.headers) + 1
            self._hand_on(delivery)

    def _receive(self, raw: Any) -> None:
        self._unsettled.add(raw.delivery_tag)
        super()._receive(raw)

    def _connect(self, max_retries: int | None) -> None:
        self._unsettled = set()
        self._counter.pending.clear()
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

    def _settle(self, delivery: Any, action: Any) -> bool:
        settled = super()._settle(delivery, action)
        if settled:
            self._unsettled.discard(delivery.raw.delivery_tag)
        return settled

    def ack(self, delivery: Any) -> bool:
        return self._settle(delivery, lambda: _ack(delivery.raw))

    def ack_many(self, deliveries: Sequence[Any]) -> None:
        """Ack with one ``multiple`` frame up to the highest tag below which
        nothing else is unsettled; ack the rest one by one.

        py-amqp has no ack coalescing of its own; under load this turns a frame
        (and a system call) per message into one per batch.
        """
        live = [d for d in deliveries if d.generation == self.generation]
        if len(live) < 2 or self._conn is None:
            super().ack_many(deliveries)
            return
        tags = sorted(d.raw.delivery_tag for d in live)
        batch = set(tags)
        lowest_other = min((t for t in self._unsettled if t not in batch), default=None)
        upto = max((t for t in tags if lowest_other is None or t < lowest_other), default=None)
        rest = [
            d
            for d in deliveries
            if d.generation != self.generation or upto is None or d.raw.delivery_tag > upto
        ]
        if upto is not None:
            covered = [d for d in live if d.raw.delivery_tag <= upto]
            channel = covered[0].raw.channel

            def ack_multiple() -> None:
                write_ack(channel, upto, True)

            if super()._settle(covered[0], ack_multiple):
                for d in covered:
                    d.raw._state = "ACK"  # kombu's bookkeeping, as Message.ack() does
                    self._unsettled.discard(d.raw.delivery_tag)
        for delivery in rest:
            self.ack(delivery)

    def _socket(self) -> Any:
        conn = self._conn
        try:
            return conn.connection.transport.sock if conn is not None else None
        except AttributeError:
            return None

    def wait(self, timeout: float, wake_fd: int) -> None:
        conn = self._conn
        sock = self._socket()
        if conn is None or sock is None:
            self._reconnect()
            return
        try:
            pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
            if not (pending and pending()):
                readable, _, _ = select.select([sock, wake_fd], [], [], timeout)
                if sock not in readable:
                    self.heartbeat_check()
                    return
            if pending is None:
                read_available(conn.connection, sock, self.read_size)
            else:
                # One frame per read, only while bytes are waiting: drain_events()
                # would go on blocking after a heartbeat frame until a method
                # arrives, which with a full prefetch window never happens until we ack.
                read_frame = conn.connection.blocking_read
                for _ in range(self.batch):
                    read_frame(None)
                    if not pending() and not select.select([sock], [], [], 0)[0]:
                        break
        except self.connection_errors as exc:
            self._lost(exc)
            return
        if self._counter.pending:
            self._recount()
        self.heartbeat_check()

    def drain(self, timeout: float) -> None:
        super().drain(timeout)
        if self._counter.pending:
            self._recount()

    def heartbeat_check(self) -> None:
        """Check heartbeats at most four times per heartbeat interval (at most once a second).

        py-amqp sends one when half the interval has passed without traffic; the
        I/O thread comes here after every wake-up, far more often than that needs.
        """
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + min(1.0, self.transport.heartbeat / 4)
        super().heartbeat_check()
