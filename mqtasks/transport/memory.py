"""In-process transport on kombu's ``memory://``, isolated per transport instance.

kombu keeps ``memory://`` queues at class level, shared by every connection in
the process. Each :class:`MemoryTransport` builds its own kombu channel class
with its own queue table, so two apps (or two tests) never see each other's
messages, and :meth:`MemoryTransport.reset` empties it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import kombu
from kombu.transport import memory as kombu_memory
from kombu.transport.virtual import BrokerState

from ._guard import GuardedVirtualMessage
from .base import Envelope, QueueSpec, Transport

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """Messages in process memory: for tests and demos; no durability, no redelivery
    after a crash. Unacknowledged messages are handed back when a worker stops."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._queues: dict[str, Any] = {}
        self._due: list[tuple[float, int, str, Envelope]] = []
        self._due_ready = threading.Condition()
        self._seq = itertools.count()
        self._scheduler: threading.Thread | None = None
        channel = type(
            "MemoryChannel",
            (kombu_memory.Channel,),
            {
                "Message": GuardedVirtualMessage,
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
        super().queue_arguments(spec)
        return {}

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        return {s.name: (q.qsize() if (q := self._queues.get(s.name)) else 0) for s in specs}

    def reset(self) -> None:
        """Drop every queued message and queue of this transport."""
        for q in self._queues.values():
            with q.mutex:
                q.queue.clear()
        self._queues.clear()
        self._declared.clear()
        with self._due_ready:
            self._due.clear()
