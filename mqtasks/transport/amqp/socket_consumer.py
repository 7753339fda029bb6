"""Reading RabbitMQ deliveries on the worker's I/O thread: one ``select()`` on the
socket and the worker's wake-up pipe, frames split from one ``recv()``, acks written
directly and coalesced into ``multiple`` acks, classic queues' deliveries counted.

:class:`SocketConsumer` is the reading half of
:class:`~mqtasks.transport.amqp.consumer.AmqpConsumer`, which adds the queues
consumed, their shares of the prefetch window and the ordered hand-back. See
:mod:`~mqtasks.transport.amqp.wire` for the frame reading and
:mod:`~mqtasks.transport.amqp.delivery_count` for the counting.
"""

from __future__ import annotations

import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..base import Delivery
from ..kombu_consumer import KombuConsumer
from .delivery_count import RedeliveryCounter, counted_returns
from .wire import READ_SIZE, read_available, write_ack

__all__ = ["SocketConsumer", "held_key"]


def held_key(raw: Any) -> tuple[int, int]:
    """A delivery's key among those held: its channel and delivery tag."""
    return raw.channel.channel_id, raw.delivery_tag


def _ack(raw: Any) -> None:
    """Acknowledge a received kombu message as ``Message.ack()`` does, with :func:`write_ack`."""
    if raw.acknowledged:
        raise raw.MessageStateError(f"Message already acknowledged with state: {raw._state}")
    write_ack(raw.channel, raw.delivery_tag, False)
    raw._state = "ACK"


class SocketConsumer(KombuConsumer):
    """Consumer that sleeps in ``select()`` on its socket and a wake-up pipe.

    kombu's ``drain_events(timeout)`` sets and restores the socket timeout on
    every call, and cannot be interrupted when a worker thread has an ack to
    send. Selecting on the socket and the worker's pipe instead wakes the I/O
    thread the moment either has something, and reads with no timeout juggling.

    On plain TCP it also reads whatever the socket holds in one ``recv()`` and
    splits the frames itself (:func:`~mqtasks.transport.amqp.wire.split_frames`):
    py-amqp reads each frame with three ``recv()`` calls (header, payload, end
    octet), where one call per wake-up serves every message that arrived.

    Subclasses plan what is consumed: ``_replan_now()`` runs before each wait,
    and ``_settled_on_side()`` after a delivery of a channel other than the
    main one is settled.
    """

    wakeable: ClassVar[bool] = True
    #: Most messages read in one wake-up before settlements are flushed again (TLS).
    batch: ClassVar[int] = 64
    #: Bytes asked of the socket per read.
    read_size: ClassVar[int] = READ_SIZE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Deliveries received on the current connection and not settled yet, by
        #: (channel, delivery tag), with the consumer tag each came through.
        self._unsettled: dict[tuple[int, int], str] = {}
        #: Ids of messages of counted queues handed back in order: they come
        #: back flagged redelivered, and pass uncounted (a copy would go to the
        #: back of the queue).
        self._handed_back: dict[str, None] = {}
        self._next_heartbeat = 0.0
        # Classic queues only flag a redelivery; their deliveries are counted here.
        default = self.transport.queue_type
        classic = [s for s in self.specs if (s.queue_type or default) == "classic"]
        self._counter = RedeliveryCounter(self.transport, classic)
        self._hand_on: Callable[[Delivery], None] | None = None
        #: A delivery is being handed on; and those that arrived meanwhile.
        self._receiving = False
        self._arrived: deque[Any] = deque()

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._hand_on = on_delivery
        # Through the counter always: a classic queue may be added later.
        super().start(self._count)

    def _count(self, delivery: Delivery) -> None:
        assert self._hand_on is not None
        handed_back = delivery.redelivered and delivery.message_id in self._handed_back
        if handed_back:
            del self._handed_back[delivery.message_id]  # type: ignore[arg-type]
            delivery.redelivered = False  # counted as the first delivery it was
        counted = self._counter.receive(delivery)
        delivery.redelivered |= handed_back
        if counted:
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
        """Hand on one delivery; one arriving meanwhile (py-amqp delivers inside a wait
        for a reply, e.g. a cancel) waits its turn, so handling never nests."""
        self._unsettled[held_key(raw)] = raw.delivery_info.get("consumer_tag") or ""
        if self._receiving:
            self._arrived.append(raw)
            return
        self._receiving = True
        try:
            super()._receive(raw)
            while self._arrived:
                super()._receive(self._arrived.popleft())
        finally:
            self._receiving = False

    def _connect(self, max_retries: int | None) -> None:
        self._unsettled = {}
        self._arrived.clear()  # of the connection gone: RabbitMQ delivers them again
        self._counter.pending.clear()
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

    def _settle(self, delivery: Any, action: Any) -> bool:
        key = held_key(delivery.raw)
        if delivery.generation == self.generation and key not in self._unsettled:
            return False  # settled already, or returned with its queue's channel
        settled = super()._settle(delivery, action)
        if settled:
            self._unsettled.pop(key, None)
            if key[0] != self._main_channel_id():
                self._settled_on_side()
        return settled

    def ack(self, delivery: Any) -> bool:
        return self._settle(delivery, lambda: _ack(delivery.raw))

    def ack_many(self, deliveries: Sequence[Any]) -> None:
        """Ack with one ``multiple`` frame up to the highest tag below which
        nothing else is unsettled; ack the rest one by one.

        py-amqp has no ack coalescing of its own; under load this turns a frame
        (and a system call) per message into one per batch.
        """
        main = self._main_channel_id()
        live = [
            d
            for d in deliveries
            if d.generation == self.generation
            and held_key(d.raw) in self._unsettled
            and d.raw.channel.channel_id == main
        ]
        if len(live) < 2 or self._conn is None:
            super().ack_many(deliveries)
            return
        tags = sorted(d.raw.delivery_tag for d in live)
        batch = set(tags)
        lowest_other = min(
            (t for c, t in self._unsettled if c == main and t not in batch), default=None
        )
        upto = max((t for t in tags if lowest_other is None or t < lowest_other), default=None)
        covered_ids = {id(d) for d in live if upto is not None and d.raw.delivery_tag <= upto}
        rest = [d for d in deliveries if id(d) not in covered_ids]
        if upto is not None:
            covered = [d for d in live if d.raw.delivery_tag <= upto]
            channel = covered[0].raw.channel

            def ack_multiple() -> None:
                write_ack(channel, upto, True)

            if super()._settle(covered[0], ack_multiple):
                for d in covered:
                    d.raw._state = "ACK"  # kombu's bookkeeping, as Message.ack() does
                    self._unsettled.pop(held_key(d.raw), None)
        for delivery in rest:
            self.ack(delivery)

    def _replan_now(self) -> None:
        """Bring the queues consumed up to date before waiting (nothing here)."""

    def _settled_on_side(self) -> None:
        """A delivery of a channel other than the main one was settled (nothing here)."""

    def _main_channel_id(self) -> int | None:
        consumer = self._consumer
        return consumer.channel.channel_id if consumer is not None else None

    def _socket(self) -> Any:
        conn = self._conn
        try:
            return conn.connection.transport.sock if conn is not None else None
        except AttributeError:
            return None

    def wait(self, timeout: float, wake_fd: int) -> None:
        self._replan_now()
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
        self._replan_now()
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
