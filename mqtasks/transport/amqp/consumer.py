"""The RabbitMQ consumer: the queues it consumes, their shares of the prefetch window,
and the ordered hand-back of deliveries.

Reading the socket, settling and counting deliveries is the job of its base,
:class:`~mqtasks.transport.amqp.socket_consumer.SocketConsumer`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import kombu
import structlog

from ..base import Delivery, QueueSpec
from .delivery_count import RedeliveryCounter
from .prefetch import split_prefetch
from .socket_consumer import SocketConsumer, held_key

__all__ = ["AmqpConsumer"]

logger = structlog.get_logger("mqtasks.transport")

#: Numbers making the consumer tags of added queues' channels unique.
_SIDE_TAGS = itertools.count(1)

#: Most message ids remembered as handed back in order (those another consumer got are never seen).
_HANDED_BACK_KEPT = 10_000


def _total(windows: Sequence[tuple[str, int]]) -> int:
    """The prefetch window of a queue's consumers together."""
    return sum(window for _, window in windows)


class AmqpConsumer(SocketConsumer):
    """The consumer of a RabbitMQ worker: reads as
    :class:`~mqtasks.transport.amqp.socket_consumer.SocketConsumer` does.

    Each queue has its own RabbitMQ consumer with a share of the prefetch
    window (``mqtasks.transport.amqp.prefetch``). When the queues change,
    a consumer whose share shrank is cancelled and subscribed again with its
    share less what its old tag still holds: the windows of live consumers
    plus what cancelled ones hold never exceed the bound. Queues added while
    consuming get a channel each, so that one can be closed to hand back its
    deliveries in order (:meth:`requeue_ordered`) without touching the others.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        #: _close_idle_sides() is under way (it may be re-entered from a delivery).
        self._closing_sides = False

    def _connect(self, max_retries: int | None) -> None:
        self._parked = set()
        self._parked_queues = set()
        self._side = {}
        super()._connect(max_retries)

    def _settled_on_side(self) -> None:
        try:
            self._close_idle_sides()
        except self.connection_errors as exc:
            self._lost(exc)

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
            self._parked.add(held_key(d.raw))  # type: ignore[attr-defined]
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
