"""The worker's side of ordered processing: partition queues consumed as they are owned,
key lanes between the consumer and the worker threads, holds in place, hand-backs.

A :class:`~mqtasks.worker.Worker` whose queues carry ordered tasks makes one
:class:`OrderedDeliveries` once its consumer runs. Its I/O thread passes it
every delivery of a partition queue (:meth:`OrderedDeliveries.arrive`), every
settlement (:meth:`~OrderedDeliveries.settled`), every retry or deferral held
in place (:meth:`~OrderedDeliveries.hold`) and calls
:meth:`~OrderedDeliveries.poll` each turn of its loop (ownership changes,
holds and gaps whose time has come). Only the I/O thread calls these, as
only it touches the consumer; the :class:`~.assignment.Assignment` thread
talks to the backend and posts its changes here.

A queue whose broker keeps each key's order itself (an SQS FIFO queue, see
``Capabilities.native_ordering``) has no partitions: its consumer hands on a
key's messages one at a time, and a retry or deferral of one waits in the
queue (:meth:`~mqtasks.transport.base.Transport.hold_in_place`), first of its key.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from ..exceptions import ConfigurationError, MQTasksError
from ..transport.base import Consumer
from .assignment import Assignment, Change
from .keys import partition_name, resume_key
from .lanes import Dispatch, Lanes, lane_of
from .options import ordered_queues

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..transport.base import Delivery

__all__ = ["RESUME_TTL", "OrderedDeliveries", "check_consumer", "ordered_deliveries"]

logger = structlog.get_logger("mqtasks.ordering")

#: Seconds a held retry's attempt number is kept in the backend past its delay.
RESUME_TTL = 86400.0


def _ordered(app: App, queues: Sequence[str]) -> dict[str, int]:
    """The partition counts of ``queues`` that carry ordered tasks, those the broker
    orders natively left out."""
    return {
        q: n
        for q, n in ordered_queues(app.tasks.values()).items()
        if q in queues and app.transport.native_ordering_refused(q) is not None
    }


def _native(app: App, queues: Sequence[str]) -> set[str]:
    """Those of ``queues`` that carry ordered tasks and that the broker orders natively."""
    return {
        q
        for q in ordered_queues(app.tasks.values())
        if q in queues and app.transport.native_ordering_refused(q) is None
    }


def check_consumer(app: App, queues: Sequence[str], consumer: Consumer) -> None:
    """Refuse a worker whose queues carry ordered tasks when its consumer cannot follow
    their partitions (add and remove queues while consuming), or without a backend.

    Raises:
        ConfigurationError: What is wrong, and what to do.
    """
    found = _ordered(app, queues)
    if not found:
        return
    if (
        type(consumer).add_queue is Consumer.add_queue
        and app.transport.capabilities.native_ordering
    ):
        raise ConfigurationError(
            "\n".join(
                f"Queue {q!r} carries ordered tasks, but "
                f"{app.transport.native_ordering_refused(q)}."
                for q in sorted(found)
            )
        )
    if type(consumer).add_queue is Consumer.add_queue:
        scheme = app.transport.schemes[0] if app.transport.schemes else "this transport"
        raise ConfigurationError(
            f"{scheme}:// cannot consume queues that come and go (add_queue), which the "
            f"partitions of the ordered tasks on {sorted(found)} need. Use amqp://, "
            "redis:// or memory://, or leave these queues to a worker on one of them."
        )
    if not app.has_backend:
        raise ConfigurationError(
            f"The ordered tasks on {sorted(found)} keep their partition leases in the result "
            "backend, and the app has none: App(..., backend='redis://...') or "
            "MQTASKS_BACKEND_URL."
        )


def ordered_deliveries(
    app: App,
    queues: Sequence[str],
    consumer: Consumer,
    *,
    dispatch: Callable[[Delivery], None],
    counted: Callable[[Delivery], None],
    wake: Callable[[], None],
) -> OrderedDeliveries | None:
    """Return the ordered-delivery machinery of a worker on ``queues``, started (joined to
    the partitions' members; it takes its share after a settle window); None if none of
    them carries ordered tasks.

    Raises:
        BackendError: The backend cannot be reached for the first leases.
        TransportError: The partition queues cannot be declared.
    """
    found = _ordered(app, queues)
    native = _native(app, queues)
    if not found and not native:
        return None
    ordered = OrderedDeliveries(
        app, found, consumer, dispatch=dispatch, counted=counted, wake=wake, native=native
    )
    # Every partition exists from now on (counted by status and drain(), even unowned).
    app.transport.declare([app.queue(name) for name in sorted(ordered.partitions)])
    ordered.start()
    return ordered


class OrderedDeliveries:
    """Partitions, lanes and holds of one worker (I/O thread only, but for :meth:`post`).

    Args:
        app: The worker's app.
        queues: Partition count by base queue.
        consumer: The worker's consumer.
        dispatch: Hands a delivery to the worker threads (which ask :meth:`verdict`).
        counted: Counts a delivery handed back to the broker as settled.
        wake: Wakes the I/O thread (any thread).
        native: Queues of ordered tasks that the broker orders natively (no partitions).
    """

    def __init__(
        self,
        app: App,
        queues: dict[str, int],
        consumer: Consumer,
        *,
        dispatch: Callable[[Delivery], None],
        counted: Callable[[Delivery], None],
        wake: Callable[[], None],
        native: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        #: Queues of ordered tasks that the broker orders natively.
        self.native = frozenset(native)
        self.consumer = consumer
        self.lanes = Lanes(app.settings.ordering_gap_timeout)
        self._dispatch = dispatch
        self._counted = counted
        self._wake = wake
        self._changes: queue.SimpleQueue[list[Change]] = queue.SimpleQueue()
        #: Partition queues consumed now.
        self.consumed: set[str] = set()
        #: Partitions being given up: waiting for their running deliveries to settle.
        self.draining: set[str] = set()
        #: Every partition queue of the worker's ordered queues, with its base queue.
        self.bases = {partition_name(q, i, n): q for q, n in queues.items() for i in range(n)}
        self.partitions = self.bases.keys()
        #: Dead-letter reasons of dispatched deliveries that must not run, by identity.
        self._verdicts: dict[int, str] = {}
        #: Next attempt (or deferral) of each delivery held in place, by identity.
        self._resume: dict[int, tuple[float, Message]] = {}
        settings = app.settings
        self.assignment = Assignment(
            app.backend,
            queues,
            lease_ttl=settings.ordering_lease_ttl,
            post=self.post,
            takeover_delay=(
                app.transport.recovery_time
                if settings.ordering_takeover_delay is None
                else settings.ordering_takeover_delay
            ),
            state_ttl=settings.ordering_state_ttl,
        )

    def start(self) -> None:
        """Join the partitions' members; the share taken after the settle window is
        consumed by the I/O thread's :meth:`poll`.

        Not consumed here: a consumer may deliver from within ``add_queue``, and
        the worker routes deliveries here only once this object is its own.
        """
        if self.partitions:
            self.assignment.start()

    def post(self, changes: list[Change]) -> None:
        """Take a round's ownership changes from the assignment thread (any thread)."""
        self._changes.put(changes)
        self._wake()

    # -- deliveries ------------------------------------------------------------------

    def arrive(self, delivery: Delivery, *, stopping: bool) -> bool:
        """Take ``delivery`` if it is from a partition queue; return whether it was taken.

        Deliveries without valid ordering headers run as they come.
        """
        if delivery.queue not in self.partitions:
            return False
        found = lane_of(delivery)
        if found is None:
            self._dispatch(delivery)
            return True
        if stopping or (
            delivery.queue not in self.consumed and delivery.queue not in self.draining
        ):
            # Arrived after the hand-back of the others (stopping, a lost lease): back at once.
            self.hand_back([delivery])
            return True
        self._run(self.lanes.arrive(delivery, found[0], found[1], time.monotonic()))
        return True

    def tracks(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is in a key lane, or from a queue ordered natively (its
        retries and deferrals then wait in place too)."""
        return delivery.queue in self.native or self.lanes.tracks(delivery)

    def settled(self, delivery: Delivery) -> None:
        """``delivery`` is settled: the next of its key may run."""
        self._resume.pop(id(delivery), None)
        self._run(self.lanes.settled(delivery, time.monotonic()))

    def hold_request(self, delivery: Delivery, delay: float, message: Message) -> None:
        """Record the next attempt of ``delivery`` to run after ``delay`` s (worker thread,
        before it posts the settlement ``hold``).

        A retry's attempt number is also kept in the backend under the message's id:
        the broker redelivers the message as it was published (attempt 1) when it is
        handed back or its worker dies, and :func:`.gate.gate` then runs it as this
        attempt, so the task's ``max_retries`` still counts.
        """
        self._resume[id(delivery)] = (delay, message)
        if message.attempt <= 1:  # a deferral of a first attempt: nothing to keep
            return
        try:
            self.app.backend.put(
                resume_key(message.id), str(message.attempt).encode(), delay + RESUME_TTL
            )
        except MQTasksError as exc:
            logger.warning(
                "ordering.attempt_unsaved",
                task_id=message.id,
                attempt=message.attempt,
                error=str(exc),
                note="a redelivery of it would count its attempts from the start",
            )

    def hold(self, delivery: Delivery) -> None:
        """Keep ``delivery`` unacked in its lane until its delay is over, then run it again
        (on a queue ordered natively, in the queue: the broker delivers it again)."""
        delay = self._resume.get(id(delivery), (0.0, None))[0]
        if delivery.queue in self.native:
            self._hold_in_queue(delivery, delay)
            return
        self.lanes.hold(delivery, time.monotonic() + delay)

    def _hold_in_queue(self, delivery: Delivery, delay: float) -> None:
        self._resume.pop(id(delivery), None)
        try:
            self.app.transport.hold_in_place(self.consumer, delivery, delay)
        except MQTasksError as exc:
            logger.warning(
                "ordering.hold_failed",
                queue=delivery.queue,
                task_id=delivery.message_id,
                error=str(exc),
                note="requeued: runs again without waiting",
            )
            self.consumer.requeue(delivery)
        self._counted(delivery)

    def verdict(self, delivery: Delivery) -> str | None:
        """The dead-letter reason ``delivery`` gets instead of running, if any (worker thread)."""
        return self._verdicts.pop(id(delivery), None)

    def resumed(self, delivery: Delivery) -> Message | None:
        """The attempt a re-dispatched held delivery runs as (worker thread), or None."""
        found = self._resume.get(id(delivery))
        return found[1] if found is not None else None

    def requeue(self, delivery: Delivery) -> None:
        """Hand ``delivery`` back unrun, with the deliveries of its key waiting behind it
        (on a queue ordered natively, its consumer hands those back; a retry held in
        place keeps its wait)."""
        if delivery.queue in self.native:
            held = self._resume.get(id(delivery))
            if held is not None:
                self._hold_in_queue(delivery, held[0])
                return
            self.consumer.requeue(delivery)
            self._counted(delivery)
            return
        self.hand_back(self.lanes.requeue(delivery))

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Give ``deliveries`` back to the broker, in order, ahead of their queues' others."""
        by_queue: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            by_queue.setdefault(delivery.queue, []).append(delivery)
        for name, group in by_queue.items():
            try:
                self.consumer.requeue_ordered(group)
            except MQTasksError as exc:  # the connection is gone: the broker has them back
                logger.warning("ordering.hand_back_failed", queue=name, error=str(exc))
            for delivery in group:
                self._resume.pop(id(delivery), None)
                self._counted(delivery)

    def next_due(self) -> float | None:
        """Seconds until a hold or a gap is due, or None."""
        when = self.lanes.next_due()
        return None if when is None else max(0.0, when - time.monotonic())

    # -- each turn of the I/O loop ---------------------------------------------------

    def poll(self) -> None:
        """Apply ownership changes; run the holds and gaps that are due; finish drains."""
        while True:
            try:
                changes = self._changes.get_nowait()
            except queue.Empty:
                break
            for kind, name in changes:
                if kind == "add":
                    self._add(name)
                else:
                    self._give_up(name, lost=kind == "lost")
        self._run(self.lanes.due(time.monotonic()))
        for name in list(self.draining):
            if not self.lanes.running([name]):
                self.hand_back(self.lanes.take(name))
                self.lanes.frozen.discard(name)
                self.draining.discard(name)
                self.assignment.released(name)

    def reset(self) -> None:
        """The consumer reconnected: what the lanes hold is stale (the broker delivers it again)."""
        for delivery in self.lanes.take():
            self._resume.pop(id(delivery), None)
            self._counted(delivery)

    def shutdown(self, started: Sequence[Delivery] = ()) -> None:
        """Hand back every ordered delivery not started: ``started`` (taken from the work
        queue unrun) and what the lanes hold."""
        waiting = self.lanes.take()
        self.hand_back([*started, *waiting])

    def close(self) -> None:
        """Release the leases and leave the members (after the consumer is closed)."""
        self.assignment.stop()

    def _add(self, name: str) -> None:
        if name in self.consumed:
            return
        if name in self.draining:  # taken again before it was drained: keep it
            self.draining.discard(name)
            self._run(self.lanes.thaw(name, time.monotonic()))
        self.consumed.add(name)  # first: a consumer may deliver from within add_queue
        try:
            self.consumer.add_queue(self.app.queue(name))
        except MQTasksError as exc:
            logger.error("ordering.add_failed", partition=name, error=str(exc))
            self.consumed.discard(name)
            self.assignment.released(name)

    def _give_up(self, name: str, *, lost: bool) -> None:
        if name in self.consumed:
            try:
                self.consumer.remove_queue(name)
            except MQTasksError as exc:
                logger.warning("ordering.remove_failed", partition=name, error=str(exc))
            self.consumed.discard(name)
        if lost:  # another worker may consume it already: hand back what is not running now
            self.hand_back(self.lanes.take(name))
            return
        # Given up in good order: nothing more of it runs here; once what runs has
        # finished, what waits (and what still arrives meanwhile) goes back in one go,
        # in order, then the lease (poll()).
        self.lanes.frozen.add(name)
        self.draining.add(name)

    def _run(self, out: list[Dispatch]) -> None:
        for delivery, reason in out:
            if reason is not None:
                self._verdicts[id(delivery)] = reason
            self._dispatch(delivery)
