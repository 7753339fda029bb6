"""The RabbitMQ consumer: one connection read by the worker's I/O thread, acks written directly.

It reads the socket itself (see :mod:`~mqtasks.transport.amqp.wire`) so the
I/O thread sleeps in one ``select()`` on the socket and the worker's wake-up
pipe, acknowledges many deliveries with one ``multiple`` ack where it can, and
counts the deliveries of classic queues (see
:mod:`~mqtasks.transport.amqp.delivery_count`).
"""

from __future__ import annotations

import contextlib
import itertools
import select
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import kombu
import structlog

from ..base import Delivery, QueueSpec
from ..kombu_consumer import KombuConsumer
from .delivery_count import RedeliveryCounter, counted_returns
from .prefetch import split_prefetch
from .wire import READ_SIZE, read_available, write_ack

__all__ = ["AmqpConsumer"]

logger = structlog.get_logger("mqtasks.transport")

#: Numbers making the consumer tags of added queues' channels unique.
_SIDE_TAGS = itertools.count(1)

#: Most message ids remembered as handed back in order (those another consumer got are never seen).
_HANDED_BACK_KEPT = 10_000


def _key(raw: Any) -> tuple[int, int]:
    """A delivery's key among those held: its channel and delivery tag."""
    return raw.channel.channel_id, raw.delivery_tag


def _total(windows: Sequence[tuple[str, int]]) -> int:
    """The prefetch window of a queue's consumers together."""
    return sum(window for _, window in windows)


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

    Each queue has its own RabbitMQ consumer with a share of the prefetch
    window (``mqtasks.transport.amqp.prefetch``). When the queues change,
    a consumer whose share shrank is cancelled and subscribed again with its
    share less what its old tag still holds: the windows of live consumers
    plus what cancelled ones hold never exceed the bound. Queues added while
    consuming get a channel each, so that one can be closed to hand back its
    deliveries in order (:meth:`requeue_ordered`) without touching the others.
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
        #: Queue -> (consumer tag, window) of its live RabbitMQ consumers, kombu's own first.
        self._windows: dict[str, list[tuple[str, int]]] = {}
        #: A queue waits for room in the window, or for its share to change.
        self._replan = False
        #: The queues consumed on the main channel: those the consumer started with.
        self._static = frozenset(s.name for s in self.specs)
        #: Queue added -> its kombu consumer, on a channel of its own.
        self._side: dict[str, Any] = {}
        #: Deliveries handed back by requeue_ordered, returned when their channel closes.
        self._parked: set[tuple[int, int]] = set()
        self._parked_queues: set[str] = set()
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
        #: _close_idle_sides() is under way (it may be re-entered from a delivery).
        self._closing_sides = False
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
        self._unsettled[_key(raw)] = raw.delivery_info.get("consumer_tag") or ""
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
        self._parked = set()
        self._parked_queues = set()
        self._side = {}
        self._counter.pending.clear()
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

    def _settle(self, delivery: Any, action: Any) -> bool:
        key = _key(delivery.raw)
        if delivery.generation == self.generation and key not in self._unsettled:
            return False  # settled already, or returned with its queue's channel
        settled = super()._settle(delivery, action)
        if settled:
            self._unsettled.pop(key, None)
            if key[0] != self._main_channel_id():
                try:
                    self._close_idle_sides()
                except self.connection_errors as exc:
                    self._lost(exc)
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
            and _key(d.raw) in self._unsettled
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
                    self._unsettled.pop(_key(d.raw), None)
        for delivery in rest:
            self.ack(delivery)

    # -- the queues consumed and their windows --------------------------------

    def _consume(self, consumer: Any) -> None:
        consumer.on_message = self._receive
        self._windows = {}
        self._plan(consumer)

    def _plan(self, consumer: Any = None) -> None:
        """Cancel the consumers of removed queues and of queues over their share;
        subscribe every queue whose share fits in the window, and give a queue
        under its share (the prefetch grew) one more consumer for the difference."""
        main = consumer or self._consumer
        if main is None or self._cancelled:
            return
        self._forget_closed(main)
        shares = split_prefetch(self.prefetch, [s.name for s in self.specs])
        bound = max(self.prefetch, len(shares))
        for name, windows in list(self._windows.items()):
            share = shares.get(name)
            if share is None or _total(windows) > share:
                self._cancel_queue(name, main)
        # Counted after the cancels: what RabbitMQ sent a consumer before its
        # cancel-ok arrived while waiting for it, and is held too.
        held = Counter(self._unsettled.values())
        live = {tag for windows in self._windows.values() for tag, _ in windows}
        # What cancelled consumers still hold, by queue: it counts against the queue's share.
        retired: Counter[str] = Counter()
        for tag, n in held.items():
            if tag not in live:
                retired[self._tags.get(tag, "")] += n
        committed = sum(_total(w) for w in self._windows.values()) + sum(retired.values())
        for name, windows in list(self._windows.items()):
            # Consumers that hold nothing are merged into one with the whole share
            # (after growing, or a window too small), when it fits.
            total = _total(windows)
            mergeable = (len(windows) > 1 or total < shares[name]) and not any(
                held[tag] for tag, _ in windows
            )
            if mergeable and committed - total + shares[name] <= bound:
                self._cancel_queue(name, main)
                committed -= total
        specs = {s.name: s for s in self.specs}
        self._replan = bool(self._parked)
        for name, share in shares.items():
            if name in self._parked_queues:
                continue  # subscribed again once its parked deliveries are back
            windows = self._windows.get(name, [])
            if not windows:
                window = share - retired[name]
            elif _total(windows) == share:
                continue
            else:
                # Grown: one consumer more for the difference, once what the queue's
                # cancelled consumers hold is settled (so the windows do not splinter).
                window = 0 if retired[name] else share - _total(windows)
            if window < 1 or committed + window > bound:
                self._replan = True  # once settlements make room
                continue
            if name not in self._static and self._conn is None:
                self._replan = True  # its channel is opened once the connect is done
                continue
            target = self._consumer_of(name, main, create=True)
            target.qos(prefetch_count=window)  # applies to consumers started from now on
            if windows:
                # One more RabbitMQ consumer of the queue: kombu keeps one per queue.
                tag = f"{name}.more.{next(_SIDE_TAGS)}"
                target._queues[name].consume(
                    tag, target._receive_callback, no_ack=False, nowait=False
                )
            else:
                queue = target.add_queue(self.transport.kombu_queue(specs[name]))
                # kombu's consume() would start every queue registered at once, with one window.
                tag = target._basic_consume(queue, no_ack=False, nowait=False)
            self._tags[tag] = name
            self._windows[name] = [*windows, (tag, window)]
            committed += window
            self._replan |= _total(self._windows[name]) < share  # grows as the rest settles

    def _forget_closed(self, main: Any) -> None:
        """Forget deliveries held on a channel no longer open: RabbitMQ has them back,
        and counted against the window they would hold it shut for good."""
        open_ids = {main.channel.channel_id} | {s.channel.channel_id for s in self._side.values()}
        stale = [k for k in self._unsettled if k[0] not in open_ids]
        if not stale:
            return
        logger.warning(
            "amqp.closed_channel_deliveries_forgotten",
            count=len(stale),
            note="their channel is closed: RabbitMQ delivers them again",
        )
        for key in stale:
            del self._unsettled[key]
            self._parked.discard(key)

    def _cancel_queue(self, name: str, main: Any) -> None:
        """Cancel every RabbitMQ consumer of queue ``name``; what they hold stays settleable."""
        target = self._consumer_of(name, main)
        for tag, _ in self._windows.pop(name, [])[1:]:
            target.channel.basic_cancel(tag)
        target.cancel_by_queue(name)

    def _prefetch_changed(self) -> None:
        """Split the new bound over the queues: a queue whose share shrank has its
        consumers cancelled and subscribed again once what they hold fits (RabbitMQ
        keeps a consumer's window for its life); one whose share grew gets a consumer more."""
        self._replan = True
        self._replan_now()

    def _consumer_of(self, name: str, main: Any, *, create: bool = False) -> Any:
        """The kombu consumer of queue ``name``: the main one for the queues the
        consumer started with, one on a channel of its own for each queue added."""
        if name in self._static:
            return main
        side = self._side.get(name)
        if side is None and create:
            assert self._conn is not None
            side = kombu.Consumer(
                self._conn.channel(),
                queues=[],
                no_ack=False,
                auto_declare=False,
                tag_prefix=f"{name}.{next(_SIDE_TAGS)}.",
            )
            side.on_message = self._receive
            self._side[name] = side
        return side if side is not None else main

    def _close_idle_sides(self) -> None:
        """Close the channel of an added queue once it holds only parked deliveries
        (RabbitMQ returns them ahead of the queue's others, in order), or nothing
        while its queue is no longer consumed.

        Cancelling the queue's consumer waits for RabbitMQ's answer, and a
        delivery it had already sent arrives meanwhile (and is handed on, which
        may park it and come back here): the channel is looked at again after
        the cancel, and closed only if it is still idle. Every delivery of a
        channel it closes is forgotten with it, as RabbitMQ has them back.
        """
        if self._closing_sides:
            self._replan = True  # re-entered from a delivery handed on meanwhile: next turn
            return
        self._closing_sides = True
        try:
            sides: list[tuple[str, Any]] = list(self._side.items())
            for name, side in sides:
                if name not in self._side or self._side[name] is not side:
                    continue  # closed meanwhile, from a delivery handed on
                if not self._side_idle(name, side):
                    continue
                if name in self._windows:
                    self._cancel_queue(name, side)
                    if not self._side_idle(name, side):
                        self._replan = True  # closed once what arrived meanwhile is settled
                        continue
                channel_id = side.channel.channel_id
                side.channel.close()
                self._side.pop(name, None)
                for key in [k for k in self._unsettled if k[0] == channel_id]:
                    del self._unsettled[key]
                    self._parked.discard(key)
                self._parked_queues.discard(name)
                self._replan = True
        finally:
            self._closing_sides = False

    def _side_idle(self, name: str, side: Any) -> bool:
        """Whether the channel of added queue ``name`` holds only parked deliveries
        (at least one), or nothing while the queue is no longer consumed."""
        channel_id = side.channel.channel_id
        keys = [k for k in self._unsettled if k[0] == channel_id]
        parked = sum(1 for k in keys if k in self._parked)
        if parked != len(keys):
            return False
        return bool(parked) or all(s.name != name for s in self.specs)

    def cancel(self) -> None:
        """Stop receiving new deliveries on every channel; held ones stay settleable."""
        consumer = self._consumer
        if consumer is not None:
            for name, windows in self._windows.items():  # kombu's cancel() knows its own only
                for tag, _ in windows[1:]:
                    with contextlib.suppress(Exception):
                        self._consumer_of(name, consumer).channel.basic_cancel(tag)
        super().cancel()
        for side in self._side.values():
            with contextlib.suppress(Exception):
                side.cancel()

    def _replan_now(self) -> None:
        if not self._replan or self._conn is None:
            return
        try:
            self._close_idle_sides()
            if self._parked and self._hand_back_parked():
                return
            self._plan()
        except self.connection_errors as exc:
            self._lost(exc)

    def add_queue(self, spec: QueueSpec) -> None:
        """Declare ``spec`` and consume it too, with a share of the prefetch window.

        Raises:
            ConfigurationError: RabbitMQ cannot honour an option of ``spec``.
            TransportError: RabbitMQ refused the declaration.
        """
        if any(s.name == spec.name for s in self.specs):
            return
        self.transport.declare([spec])
        self.specs.append(spec)  # a reconnect consumes the current list
        counted = RedeliveryCounter(self.transport, [spec]).queues
        if (spec.queue_type or self.transport.queue_type) == "classic" and counted:
            self._counter.queues = self._counter.queues | counted
        consumer = self._consumer
        if consumer is None:
            return
        try:
            self.transport.kombu_queue(spec).bind(consumer.channel).declare()
        except self.connection_errors as exc:
            self._lost(exc)
            return
        # Subscribed at the next turn of the loop (wait(), drain()), with the other
        # queues added meanwhile: the window is shared out once for them all, rather
        # than once per queue, each time cancelling the consumers whose share shrank
        # (on a quorum queue, what a cancelled consumer had checked out comes back
        # behind what a new consumer got meanwhile: out of order).
        self._replan = True

    def remove_queue(self, name: str) -> None:
        """Cancel the queue's consumer; deliveries held of it stay settleable."""
        if not any(s.name == name for s in self.specs):
            return
        self.specs = [s for s in self.specs if s.name != name]
        self._replan = True
        self._replan_now()

    def requeue_ordered(self, deliveries: Sequence[Delivery]) -> None:
        """Hand the deliveries back so they come again in order, before their queue's others.

        RabbitMQ puts a message rejected with requeue on a quorum queue behind
        the ready ones, and a consumer given room by a requeue may be sent the
        next ready message first; but a channel that closes returns what it
        holds ahead of the queue's other messages, in delivery order (classic
        queues: in their places). So the queue's consumer is cancelled and the
        deliveries are kept until nothing else is held on their channel, which
        is then closed: an added queue's own channel (its consumer subscribes
        again on a new one), or for the queues the consumer started with, the
        connection (a reconnect). While the consumer is cancelled (stopping),
        they go back at ``close()``.
        """
        live = [d for d in deliveries if d.generation == self.generation]
        consumer = self._consumer
        if not live or consumer is None:
            return  # the broker has them back, in their places
        try:
            for name in {d.queue for d in live} & self._windows.keys():
                self._cancel_queue(name, consumer)
        except self.connection_errors as exc:
            self._lost(exc)
            return
        for d in live:
            self._parked.add(_key(d.raw))  # type: ignore[attr-defined]
            self._parked_queues.add(d.queue)
            if d.queue in self._counter.queues and d.message_id:
                self._handed_back[d.message_id] = None
        while len(self._handed_back) > _HANDED_BACK_KEPT:
            del self._handed_back[next(iter(self._handed_back))]
        self._replan = True
        self._replan_now()
        if self._parked and not self._cancelled:
            logger.info(
                "amqp.hand_back_deferred",
                messages=len(self._parked),
                others_held=len(self._unsettled) - len(self._parked),
                note="returned in order once the other deliveries held are settled",
            )

    def _hand_back_parked(self) -> bool:
        """Reconnect to return the parked deliveries of the main channel once nothing
        else is held; True if done."""
        main = self._main_channel_id()
        if (
            self._cancelled
            or self._counter.pending
            or not any(k[0] == main for k in self._parked)
            or self._parked != self._unsettled.keys()
        ):
            return False
        logger.info("amqp.handed_back_in_order", messages=len(self._parked))
        self._drop()
        self._reconnect()
        return True

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
