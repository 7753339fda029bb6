"""The consuming side of the transport interface: a :class:`Consumer` hands a worker deliveries.

A consumer owns its connection and is driven by one thread, the worker's I/O
thread, which calls every method; it knows queues and deliveries, never tasks.
:mod:`mqtasks.transport.base` re-exports it with the ``Transport`` that makes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..exceptions import ConfigurationError
from .delivery import Delivery
from .queue import QueueSpec

if TYPE_CHECKING:
    from .base import Transport

__all__ = ["Consumer"]


class Consumer:
    """Receives deliveries from queues; every method runs on the thread that drains it.

    After a reconnect, deliveries of an old ``generation`` are stale:
    settling them does nothing (the broker has already handed them back).

    Args:
        transport: The transport the consumer belongs to.
        specs: Queues to consume.
        prefetch: Most unacknowledged deliveries held at once.
    """

    #: Whether :meth:`wait` can be woken through a file descriptor.
    wakeable: ClassVar[bool] = False

    def __init__(self, transport: Transport, specs: Sequence[QueueSpec], *, prefetch: int) -> None:
        self.transport = transport
        self.specs = list(specs)
        self.prefetch = prefetch
        self.generation = 0
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._cancelled = False
        self._interrupted = threading.Event()

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Connect, declare the queues and start consuming.

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        raise NotImplementedError

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them.

        Reconnects (forever, with capped backoff) when the connection is lost.
        """
        raise NotImplementedError

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Wait up to ``timeout`` for deliveries or for ``wake_fd`` to become readable.

        Consumers that cannot select on their connection (``wakeable`` False)
        only honour ``timeout``; callers then poll with short timeouts.
        """
        self.drain(timeout)

    def heartbeat_check(self) -> None:
        """Keep the connection alive; reconnect if the broker went silent."""

    def interrupt(self) -> None:
        """Make a reconnect loop in progress give up (safe from any thread)."""
        self._interrupted.set()

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge: the message is done. Returns False if it was stale."""
        raise NotImplementedError

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several deliveries (consumers may coalesce the acks)."""
        for delivery in deliveries:
            self.ack(delivery)

    def reject(self, delivery: Delivery) -> bool:
        """Reject without requeue (the broker drops or dead-letters it)."""
        raise NotImplementedError

    def requeue(self, delivery: Delivery) -> bool:
        """Hand the message back to the broker for another consumer."""
        raise NotImplementedError

    def requeue_ordered(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries of one queue so they come again in this order, first.

        ``deliveries`` come from one queue, oldest first. The base requeues
        them one by one in order; consumers whose broker requeues otherwise
        (each to the head, or behind the ready messages) override it.
        """
        for delivery in deliveries:
            self.requeue(delivery)

    def set_prefetch(self, prefetch: int) -> None:
        """Change the most unacknowledged deliveries held at once, while consuming.

        Raised, more deliveries come at once; lowered, none comes until fewer
        than the new bound are held (nothing held is handed back). A reconnect
        keeps the new bound. Runs on the thread that drains the consumer, as
        every method does.

        Raises:
            ValueError: ``prefetch`` is below 1.
        """
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}.")
        if prefetch != self.prefetch:
            self.prefetch = prefetch
            self._prefetch_changed()

    def _prefetch_changed(self) -> None:
        """Apply the new :attr:`prefetch` to the broker; consumers that read it at
        each fetch need nothing more (the base)."""

    def add_queue(self, spec: QueueSpec) -> None:
        """Start consuming one more queue, declared as :meth:`start` declares queues.

        Its deliveries go to the same callback; ``prefetch`` still bounds
        the deliveries held over all queues; a queue consumed already: nothing.
        A reconnect consumes the current queues.

        Raises:
            ConfigurationError: The transport cannot change its queues while consuming.
            ConnectionFailed: The broker cannot be reached.
        """
        raise self._fixed_queues()

    def remove_queue(self, name: str) -> None:
        """Stop receiving from queue ``name``; an unknown queue: nothing.

        Deliveries held from it stay settleable; nothing is requeued. A
        reconnect does not consume it again.

        Raises:
            ConfigurationError: The transport cannot change its queues while consuming.
        """
        raise self._fixed_queues()

    def _fixed_queues(self) -> ConfigurationError:
        scheme = self.transport.schemes[0] if self.transport.schemes else "this transport"
        return ConfigurationError(
            f"{scheme}:// cannot change its queues while consuming (add_queue/remove_queue): "
            "use amqp://, redis:// or memory:// for ordered tasks' partitions."
        )

    def cancel(self) -> None:
        """Stop receiving new deliveries; held ones stay settleable."""
        self._cancelled = True

    def close(self) -> None:
        """Close the connection; unacknowledged deliveries go back to the broker."""
        self._cancelled = True
