"""In-process transport on kombu's ``memory://``, isolated per transport instance.

kombu keeps ``memory://`` queues at class level, shared by every connection in
the process. Each :class:`MemoryTransport` builds its own kombu channel class
with its own queue table, so two apps (or two tests) never see each other's
messages, and :meth:`MemoryTransport.reset` empties it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import kombu
from kombu.transport import memory as kombu_memory
from kombu.transport.virtual import BrokerState

from ._guard import GuardedVirtualMessage
from .base import QueueSpec, Transport

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """Messages in process memory: for tests and demos; no durability, no redelivery
    after a crash. Unacknowledged messages are handed back when a worker stops."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._queues: dict[str, Any] = {}
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
