"""In-process transport on kombu's ``memory://``, isolated per transport instance.

kombu keeps ``memory://`` queues at class level, shared by every connection in
the process. Each :class:`MemoryTransport` builds its own kombu channel class
with its own queue table, so two apps (or two tests) never see each other's
messages, and :meth:`MemoryTransport.reset` empties it.

kombu's memory queues are first in, first out (its channel takes no notice of
a message's priority); this module's queues hand out higher priorities first,
as ``redis://`` does, so that code tested here orders its tasks as on a broker.

Topic exchanges (events) are a table of bindings kept by the transport, the
broker here: :meth:`MemoryTransport.emit` matches the routing key with
:func:`~mqtasks.transport.topic.topic_matches` and puts one copy in each
matching queue.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import queue as queue_module
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import kombu
from kombu.transport import memory as kombu_memory
from kombu.transport.virtual import BrokerState

from ._guard import GuardedVirtualMessage
from .base import DLQ_SUFFIX, Capabilities, Consumer, Delivery, QueueSpec, QueueStats
from .envelope import Envelope
from .errors import translate_errors
from .kombu import KombuTransport
from .kombu_consumer import KombuConsumer
from .memory_stream import MemoryStreams
from .queue import published_at
from .stream import StreamStore
from .topic import check_exchange, check_key, check_pattern, topic_matches

__all__ = ["MemoryConsumer", "MemoryTransport"]


class _TrackedChannel(kombu_memory.Channel):  # type: ignore[misc]
    """A memory channel that registers itself with its transport, so that
    :meth:`MemoryTransport.queue_stats` can count consumers and unacked messages."""

    open_channels: ClassVar[weakref.WeakSet[Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_channels.add(self)


#: Message property (kept in memory, never on a wire) counting the deliveries
#: that ended without a settlement: the consumer went away holding the message.
RETURNS_PROPERTY = "mqtasks_returns"


class _CountingChannel(kombu_memory.Channel):  # type: ignore[misc]
    """A memory channel that counts deliveries the way a broker does.

    kombu hands a message back through ``_restore`` when its channel closes with
    it unacknowledged (a worker that stopped before its task finished): that
    delivery counts. A requeue (``basic_reject(requeue=True)``, a stopping
    worker handing back what it never started) goes through
    ``_restore_at_beginning`` and does not.
    """

    def _restore(self, message: Any) -> None:
        props = message.properties
        props[RETURNS_PROPERTY] = int(props.get(RETURNS_PROPERTY, 0)) + 1
        super()._restore(message)

    #: Set by :meth:`MemoryConsumer.requeue_ordered` while it hands messages back:
    #: a requeue then goes to the head of its queue instead of the end.
    restore_to_head = False

    def _restore_at_beginning(self, message: Any) -> None:
        if not self.restore_to_head:
            kombu_memory.Channel._restore(self, message)
            return
        payload = message.serializable()
        payload["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True  # what the consumer reads
        info = message.delivery_info
        for queue in self._lookup(info["exchange"], info["routing_key"]):
            self._queue_for(queue).put_head(payload)


#: Highest priority level kept apart, as on ``redis://`` and kombu's virtual
#: transports: higher priorities count as 9.
MAX_LEVEL = 9


class _PriorityQueue(queue_module.Queue):  # type: ignore[type-arg]
    """A queue of kombu message payloads, higher priority first (0 to 9, above 9
    and above the queue's ``max_priority`` counting as those), oldest first
    among equals. Requeued messages join the end of their level, as kombu's
    memory queues put them at the end."""

    def __init__(self, name: str, max_priorities: dict[str, int]) -> None:
        self.name = name
        self.max_priorities = max_priorities  # the transport's, filled as queues are declared
        self.order = itertools.count()
        self.head_order = itertools.count(-1, -1)  # put_head: before every other message
        super().__init__()

    def _init(self, maxsize: int) -> None:
        self.queue: list[tuple[int, int, Any]] = []  # type: ignore[assignment]

    def _qsize(self) -> int:
        return len(self.queue)

    def _level(self, item: Any) -> int:
        priority = (item.get("properties") or {}).get("priority") or 0
        cap = self.max_priorities.get(self.name, MAX_LEVEL)
        return max(0, min(int(priority), cap, MAX_LEVEL))

    def _put(self, item: Any) -> None:
        heapq.heappush(self.queue, (-self._level(item), next(self.order), item))

    def put_head(self, item: Any) -> None:
        """Put ``item`` ahead of every message of its level (a requeue in order)."""
        with self.not_empty:
            heapq.heappush(self.queue, (-self._level(item), next(self.head_order), item))
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _get(self) -> Any:
        return heapq.heappop(self.queue)[2]


class _PriorityChannel(kombu_memory.Channel):  # type: ignore[misc]
    """A memory channel whose queues are :class:`_PriorityQueue` objects."""

    max_priorities: ClassVar[dict[str, int]]

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue_for(queue)

    def _queue_for(self, queue: str) -> Any:
        found = self.queues.get(queue)
        if found is None:
            found = self.queues.setdefault(queue, _PriorityQueue(queue, self.max_priorities))
        return found


def _copied(read: Any) -> Any:
    # Worker threads may add to what ``read`` copies; try again if they did meanwhile.
    for _ in range(100):
        try:
            return read()
        except RuntimeError:  # "changed size during iteration"
            continue
    return read()


def _oldest(q: Any) -> float | None:
    """The earliest publishing time of the messages ``q`` holds (its payloads' headers)."""
    with q.mutex:
        items = list(q.queue)
    times = []
    for item in items:
        payload = item[-1] if isinstance(item, tuple) else item
        headers = payload.get("headers") if isinstance(payload, dict) else None
        when = published_at(headers) if isinstance(headers, dict) else None
        if when is not None:
            times.append(when)
    return min(times) if times else None


class MemoryConsumer(KombuConsumer):
    """A memory consumer that can change its queues while consuming and requeue in order.

    kombu's virtual channel counts the prefetch window per channel, over all
    its consumers, so the queues added to the one channel share the bound.
    """

    def add_queue(self, spec: QueueSpec) -> None:
        """Declare ``spec`` and start consuming it on the live channel (consumed already: nothing)."""
        if any(s.name == spec.name for s in self.specs):
            return
        self.transport.declare([spec])
        self.specs.append(spec)  # a reconnect consumes the current list
        consumer = self._consumer
        if consumer is None:
            return
        with translate_errors(self.transport.url, "add queue"):
            consumer.add_queue(self.transport.kombu_queue(spec)).declare()
            consumer.consume()
        self._tags = {tag: name for name, tag in consumer._active_tags.items()}

    def remove_queue(self, name: str) -> None:
        """Stop consuming ``name``; held deliveries of it stay settleable."""
        self.specs = [s for s in self.specs if s.name != name]
        if self._consumer is not None:
            self._consumer.cancel_by_queue(name)

    def requeue_ordered(self, deliveries: Sequence[Delivery]) -> None:
        """Put the deliveries back at the head of their queue, in the given order.

        A plain requeue joins the end of the queue here; a head requeue puts
        each before all the others, so they go back newest first.
        """
        for delivery in reversed(deliveries):
            channel = getattr(getattr(delivery, "raw", None), "channel", None)
            if channel is None:
                self.requeue(delivery)
                continue
            channel.restore_to_head = True
            try:
                self.requeue(delivery)
            finally:
                channel.restore_to_head = False


class MemoryTransport(KombuTransport):
    """Messages in process memory: for tests and demos; no durability, no redelivery
    after a crash. Unacknowledged messages are handed back when a worker stops."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    capabilities = Capabilities(
        delays=True,
        priorities=True,
        max_priority=True,
        delivery_count=True,
        in_process=True,
        exchanges=True,
        expiring_queues=True,
        streams=True,
    )

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._queues: dict[str, Any] = {}
        self._due: list[tuple[float, int, str, Envelope]] = []
        self._due_ready = threading.Condition()
        self._seq = itertools.count()
        self._scheduler: threading.Thread | None = None
        self._channels: weakref.WeakSet[Any] = weakref.WeakSet()
        self._max_priorities: dict[str, int] = {}
        #: Topic exchange -> its bindings, ``(pattern, queue)`` pairs.
        self._exchanges: dict[str, set[tuple[str, str]]] = {}
        #: Queue declared with ``expires`` -> when its bindings stop being live (monotonic).
        self._live_until: dict[str, float] = {}
        channel = type(
            "MemoryChannel",
            (_CountingChannel, _TrackedChannel, _PriorityChannel),
            {
                "Message": GuardedVirtualMessage,
                "open_channels": self._channels,
                "max_priorities": self._max_priorities,
                "queues": self._queues,
                "events": defaultdict(set),
                # Hand unacked messages back on close, like the real brokers do.
                "do_restore": True,
            },
        )
        self.kombu_transport = type(
            "KombuMemoryTransport",
            (kombu_memory.Transport,),
            {"Channel": channel, "global_state": BrokerState()},
        )

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Publish now, or hand the message to this broker's scheduler for ``delay`` s.

        The scheduler thread belongs to the transport (the "broker"), not to a
        worker: a delayed message is never held by a worker thread.
        """
        if not delay or delay <= 0:
            super().publish(queue, envelope, timeout=timeout)
            return
        with self._due_ready:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._seq), queue, envelope))
            if self._scheduler is None:
                self._scheduler = threading.Thread(
                    target=self._schedule, name="mqtasks-memory-delays", daemon=True
                )
                self._scheduler.start()
            self._due_ready.notify()

    # -- topic exchanges (events) ----------------------------------------------

    def bind(self, exchange: str, pattern: str, spec: QueueSpec) -> None:
        """Declare ``spec`` (and its dead-letter queue) and bind it under ``pattern``."""
        check_exchange(exchange)
        check_pattern(pattern)
        self.declare([spec])
        with self._lock:
            self._exchanges.setdefault(exchange, set()).add((pattern, spec.name))
            if spec.expires is not None:  # live until then, unless bound again
                self._live_until[spec.name] = time.monotonic() + spec.expires

    def unbind(self, exchange: str, pattern: str, queue: str) -> None:
        """Remove one binding (an absent one: nothing)."""
        with self._lock:
            self._exchanges.get(exchange, set()).discard((pattern, queue))

    def bindings(self, exchange: str) -> list[tuple[str, str]]:
        """Return the ``(pattern, queue)`` bindings of ``exchange``, sorted."""
        with self._lock:
            return sorted(self._exchanges.get(exchange, ()))

    def emit(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = True
    ) -> int:
        """Put one copy in every queue bound with a matching pattern; return how many.

        Raises:
            Unroutable: ``mandatory`` and no binding matches.
        """
        check_exchange(exchange)
        check_key(routing_key)
        with self._lock:
            stale = self._drop_stale()
            bound = list(self._exchanges.get(exchange, ()))
        for name in stale:
            self._queues.pop(name, None)
        queues = sorted({q for pattern, q in bound if topic_matches(pattern, routing_key)})
        if not queues:
            if mandatory:
                raise self.unroutable_event(exchange, routing_key, envelope)
            return 0
        for queue in queues:
            super().publish(queue, envelope)
        return len(queues)

    def _drop_stale(self) -> list[str]:
        """Unbind the queues declared with ``expires`` not bound again in time; return them.

        Called with the lock held.
        """
        now = time.monotonic()
        stale = [q for q, until in self._live_until.items() if until <= now]
        for name in stale:
            del self._live_until[name]
            for bindings in self._exchanges.values():
                bindings.difference_update({b for b in bindings if b[1] == name})
        return stale

    def _schedule(self) -> None:
        while True:
            with self._due_ready:
                while not self._due or self._due[0][0] > time.monotonic():
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._due_ready.wait(wait)
                _, _, queue, envelope = heapq.heappop(self._due)
            super().publish(queue, envelope)

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove ready and delayed messages of the queues; return how many."""
        names = {s.name for s in specs}
        with self._due_ready:
            kept = [item for item in self._due if item[2] not in names]
            removed = len(self._due) - len(kept)
            self._due[:] = kept
            heapq.heapify(self._due)
        return removed + super().purge(specs)

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        with self._due_ready:
            names = [q for _, _, q, _ in self._due]
        return {s.name: names.count(s.name) for s in specs}

    def streams(self) -> StreamStore:
        """Return this process's streams (``mqtasks.transport.memory_stream``)."""
        return MemoryStreams()

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` that can add and remove queues while consuming."""
        return MemoryConsumer(self, specs, prefetch=prefetch)

    def connection(self, *, heartbeat: float = 0) -> kombu.Connection:
        # kombu warns about memory:// URLs without a host; the host means nothing here.
        return kombu.Connection(
            "memory://localhost/",
            transport=self.kombu_transport,
            transport_options=self.connection_options(),
        )

    def connection_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"polling_interval": 0.005}
        options.update(self.transport_options)
        return options

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        """Check ``spec`` (``delivery_limit`` is counted here, in process) and
        remember its ``max_priority``, which caps its messages' priorities."""
        super().queue_arguments(dataclasses.replace(spec, delivery_limit=None))
        if spec.max_priority is None:
            self._max_priorities.pop(spec.name, None)
        else:
            self._max_priorities[spec.name] = spec.max_priority
        return {}

    def delivery_count(self, raw: Any) -> int | None:
        """Deliveries so far, this one included: hand-backs at a close count, requeues do not."""
        return int((raw.properties or {}).get(RETURNS_PROPERTY, 0)) + 1

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        return {s.name: (q.qsize() if (q := self._queues.get(s.name)) else 0) for s in specs}

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Count from this transport's queues and its open channels' consumers and
        unacknowledged deliveries; a queue never declared is missing."""
        unacked: Counter[str] = Counter()
        consumers: Counter[str] = Counter()
        for channel in _copied(lambda: list(self._channels)):
            if channel.closed:
                continue
            tags = _copied(lambda c=channel: list(c._consumers))
            consumers.update(channel._tag_to_queue.get(tag) for tag in tags)
            qos = channel._qos
            if qos is None:
                continue
            dirty = _copied(lambda q=qos: set(q._dirty))
            delivered = _copied(lambda q=qos: list(q._delivered.items()))
            unacked.update(
                m.delivery_info.get("routing_key") for tag, m in delivered if tag not in dirty
            )
        ready = self.message_counts(specs)
        delayed = self.delayed_counts(specs)
        stats: dict[str, QueueStats] = {}
        for spec in specs:
            if spec.name not in self._queues:
                stats[spec.name] = QueueStats(spec.name, exists=False)
                continue
            dlq = self._queues.get(spec.name + DLQ_SUFFIX)
            stats[spec.name] = QueueStats(
                spec.name,
                ready=ready[spec.name],
                unacked=unacked[spec.name],
                delayed=delayed[spec.name],
                dead_lettered=dlq.qsize()
                if dlq is not None and not spec.name.endswith(DLQ_SUFFIX)
                else None,
                consumers=consumers[spec.name],
                head_published_at=_oldest(self._queues[spec.name]),
            )
        return stats

    def reset(self) -> None:
        """Drop every queued message and queue of this transport."""
        for q in self._queues.values():
            with q.mutex:
                q.queue.clear()
        self._queues.clear()
        self._declared.clear()
        self._max_priorities.clear()
        with self._lock:
            self._exchanges.clear()
            self._live_until.clear()
        with self._due_ready:
            self._due.clear()
        MemoryStreams.reset()
