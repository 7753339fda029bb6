"""The transport interface: opaque bodies, headers and queue names; never tasks.

A :class:`Transport` publishes :class:`~mqtasks.transport.envelope.Envelope`
objects to queues declared from :class:`~mqtasks.transport.queue.QueueSpec` and hands a worker
:class:`~mqtasks.transport.delivery.Delivery` objects through a :class:`Consumer`. It knows nothing of tasks
or the app, and this module names no broker client: what a transport can do is
told by its :class:`Capabilities`, which the layers above ask instead of
checking which class they hold.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .._url import mask_url, remember_secret
from ..exceptions import ConfigurationError, PublishError, Unroutable
from .consumer import Consumer
from .delivery import Delivery, StoredMessage, Taken
from .envelope import Envelope
from .queue import (
    DLQ_SUFFIX,
    Overflow,
    QueueSpec,
    QueueStats,
    broker_spec,
    dead_letter_spec,
)
from .stream import StreamStore
from .tls import TLSOptions

__all__ = [
    "DLQ_SUFFIX",
    "Capabilities",
    "Consumer",
    "Delivery",
    "Envelope",
    "Overflow",
    "QueueSpec",
    "QueueStats",
    "StoredMessage",
    "Taken",
    "Transport",
    "broker_spec",
    "dead_letter_spec",
]


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do; upper layers ask these instead of checking classes.

    Attributes:
        delays: Holds a message for a delay (countdowns, retry backoffs) in the broker.
        priorities: Orders the ready messages of every queue by ``Envelope.priority``.
        max_priority: Orders by priority the queues declared with
            ``QueueSpec.max_priority`` (a queue argument), and only those.
        delivery_count: Counts deliveries of a message, so ``delivery_limit`` holds.
        max_length: Enforces ``QueueSpec.max_length`` and ``overflow``.
        message_ttl: Enforces ``QueueSpec.message_ttl``.
        confirms: The broker confirms each publish and returns unroutable messages.
        dead_letter_browse: Reads a queue without taking its messages (listing dead
            letters leaves them untouched); otherwise a listing takes and requeues them.
        in_process: Lives in this process (``memory://``): :meth:`Transport.reset`
            empties it, and nothing survives the process.
        visibility_timeout: Hands a message unacknowledged for the
            ``visibility_timeout`` transport option to another consumer, although
            its worker may be alive and running it (kombu's Redis transport);
            otherwise the broker waits for the worker's connection or liveness.
        exchanges: Routes by topic exchange: :meth:`Transport.bind` and
            :meth:`Transport.emit` (events) work; otherwise they raise
            ConfigurationError.
        single_active_consumer: Honours ``QueueSpec.single_active_consumer``
            (one consumer of a queue at a time, the others on standby).
        expiring_queues: Honours ``QueueSpec.expires`` and ``durable=False``: the
            broker drops a queue once nobody uses it (broadcast tasks' queues).
        streams: Keeps replayable streams (:meth:`Transport.streams`); otherwise
            an app with ``streams=`` is refused.
        native_ordering: Some queues keep the order of each ordering key's messages
            themselves (SQS FIFO queues, by ``MessageGroupId``) and the consumer hands
            on a key's next message only once the one before is settled: ordered
            tasks on such a queue need no partitions, and their retries wait in place
            (:meth:`Transport.hold_in_place`). Which queues:
            :meth:`Transport.native_ordering_refused`.
    """

    delays: bool = False
    priorities: bool = False
    max_priority: bool = False
    delivery_count: bool = False
    max_length: bool = False
    message_ttl: bool = False
    confirms: bool = False
    dead_letter_browse: bool = False
    in_process: bool = False
    visibility_timeout: bool = False
    exchanges: bool = False
    single_active_consumer: bool = False
    expiring_queues: bool = False
    streams: bool = False
    native_ordering: bool = False


class Transport:
    """Base class of mqtasks transports: opaque bodies in, deliveries out.

    Subclasses set :attr:`schemes` and :attr:`capabilities` and implement
    publishing, consuming and the queue operations. The constructor's settings
    are common to every broker.

    Args:
        url: The broker URL.
        queue_type: ``quorum`` or ``classic`` (RabbitMQ's queue type for queues
            that do not name one).
        publish_timeout: Seconds a publish may take in all.
        publish_retries: Reconnect attempts of a publish.
        pool_size: Publishing connections kept.
        heartbeat: Seconds between heartbeats of a consumer's connection (0: off).
        connect_timeout: Seconds to wait for a connection.
        transport_options: Broker-specific options.
        tls: TLS settings, used by the TLS schemes.
    """

    #: URL schemes served by this transport.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: What this transport can do.
    capabilities: Capabilities = Capabilities()

    def __init__(
        self,
        url: str,
        *,
        queue_type: str = "quorum",
        publish_timeout: float = 10.0,
        publish_retries: int = 3,
        pool_size: int = 10,
        heartbeat: float = 10.0,
        connect_timeout: float = 5.0,
        transport_options: Mapping[str, Any] | None = None,
        tls: TLSOptions | None = None,
    ) -> None:
        remember_secret(url)
        self.url = url
        #: TLS options (used by ``amqps://``, ``rediss://``, ``rediss+kombu://``).
        self.tls = tls if tls is not None else TLSOptions()
        #: Whether the URL's scheme connects with TLS.
        self.uses_tls = self.tls.apply(url)
        self.queue_type = queue_type
        self.publish_timeout = publish_timeout
        self.publish_retries = publish_retries
        self.pool_size = pool_size
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.transport_options: dict[str, Any] = dict(transport_options or {})
        self._lock = threading.Lock()
        self._declared: set[str] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)}>"

    def close(self) -> None:
        """Close publishing connections."""
        with self._lock:
            self._declared.clear()

    # -- topology ----------------------------------------------------------

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        """Return broker-side queue arguments for ``spec``, refusing what the broker lacks.

        This checks ``spec`` against :attr:`capabilities`; brokers with queue
        arguments extend it.

        Raises:
            ConfigurationError: The broker cannot honour an option of ``spec``.
        """
        caps = self.capabilities
        scheme = self.schemes[0]
        if spec.delivery_limit and not caps.delivery_count:
            raise ConfigurationError(
                f"Queue {spec.name!r}: {scheme}:// does not count deliveries, so it "
                "cannot honour delivery_limit. Use redis:// or a RabbitMQ quorum queue, or "
                "remove delivery_limit from the queue config."
            )
        if (spec.max_length is not None and not caps.max_length) or (
            spec.message_ttl is not None and not caps.message_ttl
        ):
            raise ConfigurationError(
                f"Queue {spec.name!r}: max_length and message_ttl need a broker that enforces "
                f"them (RabbitMQ); {scheme}:// does not. Remove them from the queue "
                "config or use amqp://."
            )
        if spec.single_active_consumer and not caps.single_active_consumer:
            raise ConfigurationError(
                f"Queue {spec.name!r}: {scheme}:// has no single-active-consumer queues; "
                "remove single_active_consumer from the queue config (ordered tasks keep "
                "one consumer per partition with leases on this broker) or use amqp://."
            )
        if (spec.expires is not None or not spec.durable) and not caps.expiring_queues:
            raise ConfigurationError(
                f"Queue {spec.name!r}: {scheme}:// cannot drop a queue nobody uses, so it "
                "cannot honour expires or durable=False; use amqp://, redis:// or memory://."
            )
        return {}

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Declare queues and their dead-letter queues (idempotent; cached per transport).

        Raises:
            ConnectionFailed: The broker is unreachable.
            TransportError: The broker refused a declaration (for example a queue
                that exists with other arguments).
        """
        raise NotImplementedError

    def priority_ignored(self, spec: QueueSpec) -> str | None:
        """Return why messages of ``spec`` would not be ordered by priority; None if they are.

        The app logs it once per queue when a task sends a priority there, so a
        priority the broker drops is never dropped without a word.
        """
        caps = self.capabilities
        if caps.priorities or (caps.max_priority and spec.max_priority is not None):
            return None
        if caps.max_priority:
            return (
                f"{self.schemes[0]}:// orders messages by priority only on a queue declared "
                f"with max_priority; declare QueueSpec({spec.name!r}, queue_type='classic', "
                "max_priority=9) (RabbitMQ quorum queues have no priorities)"
            )
        return f"{self.schemes[0]}:// does not order messages by priority"

    def delay_refused(self, queue: str) -> str | None:
        """Return why a message of ``queue`` cannot be held for a delay; None if it can.

        Checked at a worker's start for the tasks whose retries (or flow-control
        waits) go back through the broker held for a delay, so the mistake is
        refused then rather than dead-lettered at the first retry.
        """
        if not self.capabilities.delays:
            return f"{self.schemes[0]}:// cannot hold a message for a delay"
        return None

    def native_ordering_refused(self, queue: str) -> str | None:
        """Return why ``queue`` cannot keep the order of an ordering key's messages
        itself; None if it can (see ``Capabilities.native_ordering``).

        Ordered tasks on a queue that can are published to it with their key as
        the broker's group; the others go through partition queues.
        """
        if not self.capabilities.native_ordering:
            return f"{self.schemes[0]}:// does not keep the order of a key's messages itself"
        return None

    def hold_in_place(self, consumer: Consumer, delivery: Delivery, delay: float) -> None:
        """Leave ``delivery`` unacknowledged in its queue, to be delivered again after
        ``delay`` s ahead of the later messages of its ordering key (a retry of an
        ordered task on a queue that orders natively). It is settled as far as
        ``consumer`` goes: the broker has it.

        Raises:
            ConfigurationError: The queue does not order natively.
        """
        raise ConfigurationError(
            f"Queue {delivery.queue!r}: {self.native_ordering_refused(delivery.queue)}, so "
            "a message cannot wait in it for its next attempt."
        )

    def forget_declared(self) -> None:
        """Forget the declaration cache (after a queue was deleted behind our back)."""
        self._declared.clear()

    @property
    def recovery_time(self) -> float:
        """Seconds at most until the broker hands back what a killed consumer held.

        0 where the broker sees the consumer's connection close (RabbitMQ,
        ``memory://``); ``redis://`` waits for its liveness key to expire.
        Ordered tasks keep partition leases longer than this, so that a
        partition's new owner finds its dead predecessor's messages back first.
        """
        return 0.0

    def check_broker(self) -> list[str]:
        """Return warnings about broker settings that weaken mqtasks' guarantees.

        Called once by a starting worker, which logs each. Transports override it.
        """
        return []

    # -- publishing --------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Publish ``envelope`` to ``queue``; return once the broker has it.

        Args:
            queue: Destination queue (the routing key on the default exchange).
            envelope: What to send.
            timeout: Seconds to wait in all; the transport's ``publish_timeout`` by default.
            delay: Seconds the broker holds the message before ``queue`` gets it.

        Raises:
            PublishError: The message was not enqueued (``Unroutable``, ``PublishNacked``
                or an outage outlasting the retries).
            ConfigurationError: ``delay`` was asked of a transport without delays.
        """
        raise NotImplementedError

    def publish_many(
        self, items: Sequence[tuple[str, Envelope]], *, timeout: float | None = None
    ) -> list[BaseException | None]:
        """Publish many messages; return, per item, None if the broker has it or the error.

        The base implementation publishes one by one; transports that can
        pipeline override it.

        Args:
            items: ``(queue, envelope)`` pairs.
            timeout: Seconds to wait in all; ``publish_timeout`` per message by default.
        """
        results: list[BaseException | None] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for queue, envelope in items:
            remaining = None if deadline is None else max(0.05, deadline - time.monotonic())
            try:
                self.publish(queue, envelope, timeout=remaining)
            except PublishError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    # -- streams -----------------------------------------------------------------

    def streams(self) -> StreamStore:
        """Return the broker's streams (``mqtasks.transport.stream``).

        Raises:
            ConfigurationError: :attr:`Capabilities.streams` is False.
        """
        raise ConfigurationError(
            f"{self.schemes[0]}:// keeps no replayable streams: use amqp:// (RabbitMQ 3.9+ "
            "stream queues), redis:// (Redis Streams) or memory://, or plain events "
            "(app.emit / @app.on without stream=)."
        )

    # -- topic exchanges (events) ----------------------------------------------

    def require_exchanges(self) -> None:
        """Refuse topic routing on a transport without it.

        Raises:
            ConfigurationError: :attr:`Capabilities.exchanges` is False.
        """
        if not self.capabilities.exchanges:
            raise ConfigurationError(
                f"{self.schemes[0]}:// cannot route events: use amqp://, redis:// or memory://."
            )

    @staticmethod
    def unroutable_event(exchange: str, routing_key: str, envelope: Envelope) -> Unroutable:
        """The error of a mandatory :meth:`emit` that no binding matched."""
        return Unroutable(
            f"Message {envelope.message_id} was NOT published: no queue is bound to exchange "
            f"{exchange!r} with a pattern matching {routing_key!r}. Start a subscriber (or "
            "declare its bindings) first, or emit with mandatory=False.",
            task_id=envelope.message_id,
        )

    def bind(self, exchange: str, pattern: str, spec: QueueSpec) -> None:
        """Bind queue ``spec`` to topic exchange ``exchange`` under ``pattern`` (idempotent).

        Declares the durable topic exchange, the queue and its dead-letter queue
        (as :meth:`declare` does) and one binding: messages emitted to
        ``exchange`` with a routing key that ``pattern`` matches (AMQP topic
        syntax, :mod:`mqtasks.transport.topic`) reach the queue.

        Raises:
            ValueError: ``pattern`` is not a usable pattern (``check_pattern``).
            ConfigurationError: The transport cannot route events.
            ConnectionFailed: The broker is unreachable.
            TransportError: The broker refused a declaration.
        """
        self.require_exchanges()
        raise NotImplementedError

    def unbind(self, exchange: str, pattern: str, queue: str) -> None:
        """Remove the binding of ``queue`` to ``exchange`` under ``pattern`` (absent: nothing).

        Raises:
            ConfigurationError: The transport cannot route events.
            ConnectionFailed: The broker is unreachable.
        """
        self.require_exchanges()
        raise NotImplementedError

    def bindings(self, exchange: str) -> list[tuple[str, str]]:
        """Return the ``(pattern, queue)`` bindings of ``exchange``, sorted.

        Raises:
            ConfigurationError: The transport cannot route events.
            ConnectionFailed: The broker is unreachable.
        """
        self.require_exchanges()
        raise NotImplementedError

    def emit(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = True
    ) -> int:
        """Publish ``envelope`` once to topic exchange ``exchange`` under ``routing_key``.

        Every queue bound with a pattern that matches the key gets one copy,
        whatever number of its patterns match. Returns once the broker has it,
        as :meth:`publish` does (confirmed where the broker confirms).

        Args:
            exchange: The topic exchange.
            routing_key: The key bindings are matched against (``order.created``).
            envelope: What to send.
            mandatory: Raise :class:`~mqtasks.exceptions.Unroutable` when no
                binding matches; False: the message is dropped quietly.

        Returns:
            How many queues got it, where the broker tells (-1 where it does not).

        Raises:
            ValueError: ``routing_key`` is not a usable key (``check_key``).
            ConfigurationError: The transport cannot route events.
            Unroutable: ``mandatory`` and no binding matches.
            PublishError: The message was not published (``PublishNacked``, an
                outage outlasting the retries).
        """
        self.require_exchanges()
        raise NotImplementedError

    # -- consuming ---------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` that owns its own connection."""
        raise NotImplementedError

    # -- reading queues --------------------------------------------------------

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return the number of ready messages per queue.

        Raises:
            QueueNotFound: A queue does not exist (RabbitMQ; on Redis an absent
                queue is an empty one).
        """
        raise NotImplementedError

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return, per queue, how many messages the broker holds for a delay.

        Transports that cannot tell per queue (RabbitMQ's delay queues are shared)
        return an empty mapping.
        """
        return {}

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Return what the broker tells about each queue, by queue name.

        A queue that does not exist is reported with ``exists=False``, never
        raised. The base implementation counts ready, delayed and dead-lettered
        messages; transports that can tell more override it.

        Args:
            specs: The queues.
            management_url: Where the broker's HTTP management API answers, for
                transports that read counts there (RabbitMQ: the
                ``rabbitmq_management_url`` setting); others ignore it.

        Raises:
            ConnectionFailed: The broker cannot be reached.
            TransportError: The broker refused.
        """
        from ..exceptions import QueueNotFound

        stats: dict[str, QueueStats] = {}
        for spec in specs:
            try:
                ready = self.message_counts([spec]).get(spec.name)
            except QueueNotFound:
                stats[spec.name] = QueueStats(spec.name, exists=False)
                continue
            dead: int | None = None
            if not spec.name.endswith(DLQ_SUFFIX):
                try:
                    dead = self.message_counts([dead_letter_spec(spec)]).get(spec.name + DLQ_SUFFIX)
                except QueueNotFound:
                    dead = None
            delayed = self.delayed_counts([spec]).get(spec.name)
            stats[spec.name] = QueueStats(
                spec.name, ready=ready, delayed=delayed, dead_lettered=dead
            )
        return stats

    def take(self, queue: str) -> contextlib.AbstractContextManager[Iterator[Taken]]:
        """Take the messages of ``queue`` one by one, oldest first, without a consumer.

        Used by dead-letter tooling. Each item comes with a function that removes
        it for good; on leaving the context, every message taken and not removed
        is back in the queue.

        Raises:
            QueueNotFound: The queue does not exist (RabbitMQ).
            TransportError: The broker cannot be reached or refused.
        """
        raise NotImplementedError

    def browse(self, queue: str, limit: int | None = None) -> list[StoredMessage]:
        """Return up to ``limit`` messages of ``queue``, oldest first, leaving them there.

        With :attr:`Capabilities.dead_letter_browse` the queue is read without
        touching it; otherwise messages are taken and put back (they are
        marked redelivered, may be re-ordered, and are invisible to others
        meanwhile).

        Raises:
            QueueNotFound: The queue does not exist (RabbitMQ).
            TransportError: The broker cannot be reached or refused.
        """
        found: list[StoredMessage] = []
        if limit == 0:
            return found
        with self.take(queue) as messages:
            for message, _ in messages:
                found.append(message)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove all ready messages from the queues; return how many."""
        raise NotImplementedError

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues (used by tests and tooling)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop every queue and message (only :attr:`Capabilities.in_process` transports).

        Raises:
            ConfigurationError: The broker is not in this process.
        """
        raise ConfigurationError(
            f"{self.schemes[0]}:// keeps its messages in a broker; only memory:// can be reset."
        )
