"""What the kombu-backed transports share: pooled confirmed publishing, one
consuming connection per worker with reconnects and heartbeats, and reading a
queue with ``basic_get``.

``amqp://``, ``redis+kombu://`` and ``memory://`` build on :class:`KombuTransport`;
``redis://`` speaks to Redis directly and does not.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import kombu
import structlog
from kombu import pools
from kombu.resource import Resource
from kombu.utils.functional import ChannelPromise

from .._url import mask_url, redact
from ..exceptions import (
    ConfigurationError,
    PublishError,
    PublishNacked,
    QueueNotFound,
    TransportError,
)
from .base import (
    DLQ_SUFFIX,
    Consumer,
    QueueSpec,
    StoredMessage,
    Taken,
    Transport,
    broker_spec,
    dead_letter_spec,
)
from .envelope import Envelope
from .errors import caused_by, translate_errors
from .kombu_consumer import KombuConsumer, KombuDelivery

if TYPE_CHECKING:
    from kombu.message import Message as KombuMessage

__all__ = [
    "KombuConsumer",
    "KombuDelivery",
    "KombuTransport",
    "deadline_errback",
]

logger = structlog.get_logger("mqtasks.transport")


class _FailoverConnection(kombu.Connection):  # type: ignore[misc]
    """A kombu connection that keeps mqtasks' transport class when it fails over.

    kombu's ``Connection.switch()`` (called when it moves to the next URL of a
    ``;``-separated failover list) takes the transport from the new URL's
    scheme, dropping the class given at construction: a worker would then read
    bodies with kombu's stock transport and fail on every message.
    """

    def switch(self, conn_str: str) -> None:
        super().switch(conn_str)
        initial: Any = self._initial_params["transport"]
        if initial:
            self.transport_cls = initial


class KombuTransport(Transport):
    """A transport with kombu underneath: what ``amqp://``, ``redis+kombu://`` and
    ``memory://`` share.

    Subclasses set :attr:`kombu_transport` and adjust queue arguments and the
    publish step to their broker. Publishing goes through a pool of connections
    and producers; consuming through a :class:`KombuConsumer` that owns one
    connection. Takes :class:`~mqtasks.transport.base.Transport`'s arguments.
    """

    #: The kombu transport class (or alias) underneath.
    kombu_transport: Any = None

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._producers: pools.ProducerPool | None = None
        self._connections: Any = None
        self._local = threading.local()
        #: The connection message_counts() reads over, and its lock.
        self._counts_conn: kombu.Connection | None = None
        self._counts_lock = threading.Lock()

    # -- connections -------------------------------------------------------

    def connection(self, *, heartbeat: float = 0) -> kombu.Connection:
        """Return a new (unconnected) kombu connection to this broker."""
        return _FailoverConnection(
            self.url,
            transport=self.kombu_transport,
            heartbeat=heartbeat,
            connect_timeout=self.connect_timeout,
            transport_options=self.connection_options(),
            ssl=self.kombu_ssl(),
        )

    def kombu_ssl(self) -> dict[str, Any] | bool:
        """Return kombu's ``ssl`` connection argument: False unless the URL uses TLS."""
        return False

    def connection_options(self) -> dict[str, Any]:
        """Return the kombu ``transport_options`` for connections of this transport."""
        return dict(self.transport_options)

    def _pool(self) -> pools.ProducerPool:
        if self._producers is None:
            with self._lock:
                if self._producers is None:
                    self._connections = self.connection().Pool(limit=self.pool_size)
                    producer_cls = _producer_factory(
                        self._on_return if self.capabilities.confirms else None
                    )
                    self._producers = _BoundProducerPool(
                        self._connections, limit=self.pool_size, Producer=producer_cls
                    )
        return self._producers

    def close(self) -> None:
        """Close pooled publishing connections."""
        with self._lock:
            if self._producers is not None:
                self._producers.force_close_all()
                self._connections.force_close_all()
                self._producers = None
                self._connections = None
            self._declared.clear()
        with self._counts_lock:
            conn, self._counts_conn = self._counts_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    # -- topology ----------------------------------------------------------

    def kombu_queue(self, spec: QueueSpec) -> kombu.Queue:
        """Return the kombu queue for ``spec`` (bound to the default exchange)."""
        spec = broker_spec(spec)
        return kombu.Queue(
            spec.name,
            exchange=kombu.Exchange(""),
            routing_key=spec.name,
            durable=spec.durable,
            auto_delete=False,
            queue_arguments=self.queue_arguments(spec) or None,
            max_priority=None,
        )

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Declare queues (idempotent; cached per transport).

        Raises:
            ConnectionFailed: The broker is unreachable.
            TransportError: The broker refused a declaration (for example a queue
                that exists with other arguments).
        """
        todo = [s for s in specs if s.name not in self._declared]
        if not todo:
            return
        # A queue naming another's dead-letter queue (QueueSpec.dead_letter_queue) has none.
        dead = [
            dead_letter_spec(s)
            for s in todo
            if not s.name.endswith(DLQ_SUFFIX) and s.dead_letter_queue is None
        ]
        queues = [self.kombu_queue(s) for s in [*todo, *dead]]
        with translate_errors(self.url, "declare queues"), self.connection() as conn:
            conn.ensure_connection(max_retries=self.publish_retries, timeout=self.publish_timeout)
            channel = conn.default_channel
            self.declare_topology(channel)
            for q in queues:
                q.bind(channel).declare()
            self.bind_queues(channel, todo)
        self._declared.update(s.name for s in [*todo, *dead])

    def declare_topology(self, channel: Any) -> None:
        """Declare exchanges and queues shared by all queues (once per transport)."""

    def bind_queues(self, channel: Any, specs: Sequence[QueueSpec]) -> None:
        """Bind freshly declared queues to the shared topology."""

    # -- publishing --------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Publish through a pooled producer (see :meth:`Transport.publish <mqtasks.transport.base.Transport.publish>`)."""
        exchange, routing_key = self.route(queue, delay)
        returned = self._publish_pooled(exchange, routing_key, envelope, timeout, repr(queue))
        if returned is not None:
            self._raise_returned(queue, envelope, returned)

    def _publish_pooled(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        timeout: float | None,
        where: str,
        mandatory: bool | None = None,
    ) -> tuple[Any, str] | None:
        """Publish through a pooled producer; return the broker's return, if it sent one.

        Args:
            where: The destination as error messages name it.
            mandatory: Ask the broker to return the message when nothing is
                bound; by default where the broker confirms.

        Raises:
            PublishError: Not published (``PublishNacked`` for a broker's nack).
        """
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pool = self._pool()
        try:
            nacked: Exception | None = None
            with pool.acquire(block=True, timeout=timeout) as producer:
                self._local.returned = None
                try:
                    self._publish(
                        producer, exchange, routing_key, envelope, deadline, mandatory=mandatory
                    )
                except Exception as exc:
                    if not caused_by(exc, "MessageNacked"):
                        # Returned to the pool after an error, the connection would be
                        # closed politely, waiting seconds more for a broker that does
                        # not answer; drop it instead (the pool makes a new one).
                        with contextlib.suppress(Exception):
                            producer.connection.collect()
                        raise
                    # A nack leaves the connection as good as before; raised inside
                    # this block, kombu would close it and the next publish open another.
                    nacked = exc
                returned: tuple[Any, str] | None = self._local.returned
            if nacked is not None:
                raise nacked
        except PublishError:
            raise
        except Exception as exc:
            if caused_by(exc, "MessageNacked"):  # py-amqp: a basic.nack for our message
                raise PublishNacked(
                    f"Task {envelope.message_id} was NOT enqueued: the broker refused it on "
                    f"{where} (a full queue with overflow=reject-publish, or a broker alarm).",
                    task_id=envelope.message_id,
                ) from exc
            raise PublishError(
                redact(
                    f"Task {envelope.message_id} was NOT enqueued on {where}: "
                    f"{type(exc).__name__}: {exc} (broker {mask_url(self.url)})"
                ),
                task_id=envelope.message_id,
            ) from exc
        return returned

    def route(self, queue: str, delay: float | None) -> tuple[str, str]:
        """Return ``(exchange, routing_key)`` that reaches ``queue`` after ``delay`` seconds.

        Raises:
            ConfigurationError: The transport cannot hold messages for a delay.
        """
        if delay:
            raise ConfigurationError(
                f"{self.schemes[0]}:// cannot hold a message for a delay; delays "
                "(countdown, retries) are held by amqp://, redis:// and memory://."
            )
        return "", queue

    def _publish(
        self,
        producer: kombu.Producer,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        deadline: float,
        *,
        mandatory: bool | None = None,
    ) -> None:
        remaining = max(0.05, deadline - time.monotonic())
        policy = {
            "max_retries": self.publish_retries,
            "interval_start": 0.1,
            "interval_step": 0.5,
            "interval_max": 2.0,
            "errback": deadline_errback(producer.connection, deadline, self.connect_timeout),
        }
        producer.publish(
            envelope.body,
            exchange=exchange,
            routing_key=routing_key,
            headers=dict(envelope.headers),
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            message_id=envelope.message_id,
            priority=envelope.priority,
            delivery_mode=2,
            mandatory=self.capabilities.confirms if mandatory is None else mandatory,
            retry=True,
            retry_policy=policy,
            timeout=remaining,
            confirm_timeout=remaining,
        )

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Any) -> None:
        # Called by py-amqp in the publishing thread while it waits for the confirm.
        self._local.returned = (exc, routing_key)

    def _raise_returned(self, queue: str, envelope: Envelope, returned: tuple[Any, str]) -> None:
        from ..exceptions import Unroutable

        self.forget_declared()
        exc, _ = returned
        raise Unroutable(
            f"Task {envelope.message_id} was NOT enqueued: no queue named {queue!r} is bound "
            f"({exc}). Declare the queue (start a worker for it) or fix the task's queue.",
            task_id=envelope.message_id,
        )

    # -- consuming ---------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` that owns its own connection."""
        return KombuConsumer(self, specs, prefetch=prefetch)

    def delivery_count(self, raw: KombuMessage) -> int | None:
        """Return how many times the broker has delivered ``raw``, this time included.

        RabbitMQ quorum queues count returns in the ``x-delivery-count`` header;
        a message that was never redelivered is on its first delivery anywhere.
        Otherwise the count is unknown: None.
        """
        returns = (raw.headers or {}).get("x-delivery-count")
        if isinstance(returns, int) and not isinstance(returns, bool) and returns >= 0:
            return returns + 1
        return None if raw.delivery_info.get("redelivered") else 1

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return the number of ready messages per queue.

        Read over one connection kept for these readings (the autoscaler and the
        StatsD gauges read every few seconds, where a connection per reading
        would cost a handshake each time), made again after any error: a kept
        connection the broker closed meanwhile is tried once more on a new one.

        Raises:
            QueueNotFound: A queue does not exist (RabbitMQ; on Redis an absent
                queue is an empty one).
        """
        with self._counts_lock:
            for last_try in (False, True):
                fresh = self._counts_conn is None
                if fresh:
                    self._counts_conn = self.connection()
                try:
                    return self._count(self._counts_conn, specs)
                except QueueNotFound:
                    self._drop_counts_connection()
                    raise
                except TransportError:
                    self._drop_counts_connection()
                    if fresh or last_try:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _count(self, conn: kombu.Connection, specs: Sequence[QueueSpec]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for spec in specs:
            with translate_errors(self.url, "count messages", queue=spec.name):
                q = self.kombu_queue(spec).bind(conn.default_channel)
                _, count, _ = q.queue_declare(passive=True)
            counts[spec.name] = int(count or 0)
        return counts

    def _drop_counts_connection(self) -> None:
        conn, self._counts_conn = self._counts_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    @contextlib.contextmanager
    def take(self, queue: str) -> Iterator[Iterator[Taken]]:
        """Take messages with ``basic_get``; what is not removed is requeued on exit."""
        held: list[Any] = []
        with translate_errors(self.url, f"read {queue!r}", queue=queue), self.connection() as conn:
            channel = conn.channel()

            def messages() -> Iterator[Taken]:
                while True:
                    with translate_errors(self.url, f"read {queue!r}", queue=queue):
                        raw = channel.basic_get(queue, no_ack=False)
                    if raw is None:
                        return
                    if not hasattr(raw, "ack"):  # py-amqp's own message: let kombu wrap it
                        raw = channel.message_to_python(raw)
                    held.append(raw)
                    yield (
                        StoredMessage(
                            body=raw.body
                            if isinstance(raw.body, bytes)
                            else bytes(raw.body or b""),
                            message_id=raw.properties.get("message_id"),
                            headers=raw.headers or {},
                            content_type=raw.content_type,
                            content_encoding=raw.content_encoding,
                        ),
                        raw.ack,
                    )

            try:
                yield messages()
            finally:
                # Reverse order: in-process brokers put a requeued message at the front.
                for raw in reversed(held):
                    if not raw.acknowledged:
                        with contextlib.suppress(Exception):
                            raw.requeue()

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove all ready messages from the queues; return how many."""
        total = 0
        with translate_errors(self.url, "purge"), self.connection() as conn:
            channel = conn.default_channel
            for spec in specs:
                total += int(self.kombu_queue(spec).bind(channel).purge() or 0)
        return total

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues (used by tests and tooling)."""
        with translate_errors(self.url, "delete queues"), self.connection() as conn:
            channel = conn.default_channel
            for spec in specs:
                self.kombu_queue(spec).bind(channel).delete()
                self._declared.discard(spec.name)


def deadline_errback(
    connection: kombu.Connection, deadline: float, connect_timeout: float
) -> Callable[..., None]:
    """An ``errback`` for kombu's ``ensure`` that keeps its reconnects within ``deadline``.

    kombu retries a lost connection ``max_retries`` times, each attempt waiting up
    to ``connect_timeout`` for a broker that accepts TCP but does not answer (a
    frozen one): several times the publish timeout in all. The connection's
    ``connect_timeout`` is cut to the time left now and before each reconnect
    attempt, and the errback gives up once no time is left.

    Args:
        connection: The (pooled) connection a publish runs on.
        deadline: ``time.monotonic()`` value by which the publish must end.
        connect_timeout: The configured connect timeout, never exceeded.

    Raises:
        TimeoutError: The deadline has passed (kombu re-raises it as OperationalError).
    """

    connection.connect_timeout = max(0.05, min(connect_timeout, deadline - time.monotonic()))

    def errback(exc: BaseException, interval: float) -> None:
        remaining = deadline - time.monotonic() - interval
        if remaining <= 0:
            raise TimeoutError(
                f"no answer from the broker within the publish timeout ({type(exc).__name__})"
            ) from exc
        connection.connect_timeout = min(connect_timeout, remaining)

    return errback


class _BoundProducerPool(pools.ProducerPool):  # type: ignore[misc]
    """A producer pool whose producers keep their connection and channel between uses.

    kombu's ``ProducerPool`` hands a producer's connection back to the connection
    pool on every release and binds it again on the next acquire (a connection
    from the pool, a channel promise, a copy of the exchange): a large share of
    the CPU time of a confirmed ``delay()``. Here a producer keeps its connection
    (the two pools have the same size, so every connection stays with one
    producer) and is unbound, as kombu does it, only when its connection or
    channel is no longer usable: lost, collected after an error, or closed.
    """

    def release(self, resource: Any) -> None:
        conn = resource.__connection__
        channel = resource._channel
        if (
            conn is not None
            and channel is not None
            and conn.connected
            and (isinstance(channel, ChannelPromise) or getattr(channel, "is_open", False))
        ):
            Resource.release(self, resource)  # bound as it is
        else:
            super().release(resource)


def _producer_factory(on_return: Callable[..., None] | None) -> Callable[[Any], kombu.Producer]:
    def make(connection: Any) -> kombu.Producer:
        return kombu.Producer(connection, on_return=on_return, auto_declare=False)

    return make
