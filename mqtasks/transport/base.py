"""The transport interface: opaque bodies, headers and queue names; never tasks.

A :class:`Transport` publishes :class:`Envelope` objects to queues declared from
:class:`QueueSpec` and hands a worker :class:`Delivery` objects through a
:class:`Consumer`. It knows nothing of tasks or the app.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import kombu
import structlog
from kombu import pools
from kombu.exceptions import OperationalError
from kombu.resource import Resource
from kombu.utils.functional import ChannelPromise

from .._url import mask_url, redact, remember_secret
from ..exceptions import (
    ConfigurationError,
    ConnectionFailed,
    PublishError,
    PublishNacked,
    QueueNotFound,
    TransportError,
)
from .tls import TLSOptions, tls_failure

if TYPE_CHECKING:
    from kombu.message import Message as KombuMessage

__all__ = [
    "DLQ_SUFFIX",
    "Consumer",
    "Delivery",
    "Envelope",
    "QueueSpec",
    "QueueStats",
    "Transport",
    "broker_spec",
    "dead_letter_spec",
    "translate_errors",
]

#: A queue's dead letters go to the queue of the same name with this suffix.
DLQ_SUFFIX = ".dlq"

logger = structlog.get_logger("mqtasks.transport")

#: Overflow behaviours of a bounded queue (RabbitMQ's ``x-overflow``).
Overflow = Literal["drop-head", "reject-publish"]


@dataclass(frozen=True)
class QueueSpec:
    """How a queue is declared.

    Args:
        name: Queue name (also the routing key).
        queue_type: ``quorum`` or ``classic`` (RabbitMQ); ``None`` takes the app's setting.
        max_priority: Highest message priority honoured: RabbitMQ classic queues
            (``x-max-priority``). Redis always orders priorities 0 to 9 (higher
            first, as on RabbitMQ; larger values count as 9); memory ignores them.
        message_ttl: Seconds a message may wait in the queue before the broker drops it.
        max_length: Most ready messages the queue holds.
        overflow: What happens past ``max_length``.
        delivery_limit: Most deliveries of a message that keeps coming back (its
            worker crashed, was killed, lost its connection): when it arrives once
            more, the worker dead-letters it with reason ``delivery_limit``
            instead of running it. ``None`` takes the app's
            :attr:`~mqtasks.config.Settings.delivery_limit`; ``0`` turns the
            limit off for this queue. Counted by ``redis://``, ``memory://`` and
            RabbitMQ quorum queues (which also get ``x-delivery-limit``, so the
            broker dead-letters it itself if no worker does); other queues refuse
            an explicit limit with a ConfigurationError.
    """

    name: str
    queue_type: Literal["quorum", "classic"] | None = None
    max_priority: int | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    overflow: Overflow = "reject-publish"
    delivery_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise ConfigurationError(f"Queue name {self.name!r} must be 1 to 200 characters.")
        if any(c in self.name for c in "#* "):
            raise ConfigurationError(
                f"Queue name {self.name!r} may not contain '#', '*' or spaces "
                "(they are routing-pattern characters)."
            )
        if self.max_priority is not None and not 1 <= self.max_priority <= 255:
            raise ConfigurationError(f"Queue {self.name!r}: max_priority must be 1 to 255.")
        if self.message_ttl is not None and self.message_ttl <= 0:
            raise ConfigurationError(f"Queue {self.name!r}: message_ttl must be positive seconds.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigurationError(f"Queue {self.name!r}: max_length must be at least 1.")
        if self.delivery_limit is not None and (
            isinstance(self.delivery_limit, bool)
            or not isinstance(self.delivery_limit, int)
            or self.delivery_limit < 0
        ):
            raise ConfigurationError(
                f"Queue {self.name!r}: delivery_limit must be a number of deliveries "
                f"(at least 1), 0 for no limit, or None for the app's default; "
                f"not {self.delivery_limit!r}."
            )
        if self.overflow not in ("drop-head", "reject-publish"):
            raise ConfigurationError(
                f"Queue {self.name!r}: overflow must be 'drop-head' or 'reject-publish'."
            )


def broker_spec(spec: QueueSpec) -> QueueSpec:
    """Return ``spec`` as a broker declares it: ``delivery_limit=0`` (off) becomes None.

    An inherited limit (None) is enforced by the worker from the delivery count
    alone and never becomes a queue argument: a queue declared before the
    default changed keeps its arguments, so redeclaring it does not fail.
    """
    if spec.delivery_limit == 0:
        return dataclasses.replace(spec, delivery_limit=None)
    return spec


def dead_letter_spec(spec: QueueSpec) -> QueueSpec:
    """Return the spec of ``spec``'s dead-letter queue: same type, no limits."""
    return QueueSpec(spec.name + DLQ_SUFFIX, queue_type=spec.queue_type)


@dataclass(frozen=True)
class QueueStats:
    """What a broker tells about one queue; ``None`` where it cannot tell.

    Attributes:
        name: The queue.
        exists: False if the broker has no such queue (every count is then ``None``).
        ready: Messages waiting for a consumer.
        unacked: Messages delivered to consumers and not yet acknowledged.
        delayed: Messages the broker holds for a delay (countdowns, retry backoffs).
        delayed_scope: ``queue`` if :attr:`delayed` counts this queue's messages,
            ``vhost`` if the broker cannot attribute them and it is the total held
            for every queue of the virtual host (RabbitMQ's shared delay queues).
        dead_lettered: Entries of the queue's dead-letter queue (``None`` if that
            queue does not exist).
        consumers: Consumers attached to the queue.
    """

    name: str
    exists: bool = True
    ready: int | None = None
    unacked: int | None = None
    delayed: int | None = None
    delayed_scope: Literal["queue", "vhost"] = "queue"
    dead_lettered: int | None = None
    consumers: int | None = None


@dataclass(frozen=True)
class Envelope:
    """What a transport publishes: an opaque body plus metadata."""

    body: bytes
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    priority: int | None = None


class Delivery:
    """A received message, owned by the consumer that delivered it.

    Settle it exactly once through :meth:`Consumer.ack`, :meth:`Consumer.reject`
    or :meth:`Consumer.requeue`.
    """

    __slots__ = (
        "body",
        "content_encoding",
        "content_type",
        "delivery_count",
        "generation",
        "headers",
        "message_id",
        "priority",
        "queue",
        "raw",
        "received_at",
        "redelivered",
        "refused",
    )

    def __init__(
        self,
        raw: KombuMessage,
        queue: str,
        generation: int,
        delivery_count: int | None = None,
    ) -> None:
        props = raw.properties
        self.raw = raw
        self.body: bytes = raw.body if isinstance(raw.body, bytes) else bytes(raw.body or b"")
        self.headers: Mapping[str, Any] = raw.headers or {}
        self.message_id: str | None = props.get("message_id")
        self.content_type: str | None = raw.content_type
        self.content_encoding: str | None = raw.content_encoding
        self.priority: int | None = props.get("priority")
        self.redelivered: bool = bool(raw.delivery_info.get("redelivered"))
        self.queue = queue
        self.generation = generation
        self.received_at = time.time()
        #: Set by the transport when it refused to let kombu touch the body.
        self.refused: str | None = getattr(raw, "mqtasks_refused", None)
        #: Deliveries of this message so far, this one included, as the broker
        #: counted them; None when the broker does not count.
        self.delivery_count = delivery_count

    def __repr__(self) -> str:
        return f"<Delivery {self.message_id} from {self.queue!r}>"


@contextlib.contextmanager
def translate_errors(url: str, what: str) -> Iterator[None]:
    """Turn kombu, py-amqp and redis errors into :class:`~mqtasks.exceptions.TransportError` subclasses."""
    try:
        yield
    except TransportError:
        raise
    except (OperationalError, ConnectionError, OSError, TimeoutError) as exc:
        raise ConnectionFailed(_unreachable(url, what, exc)) from exc
    except Exception as exc:
        if isinstance(exc, _connection_errors()):
            raise ConnectionFailed(_unreachable(url, what, exc)) from exc
        if isinstance(exc, _channel_errors()):
            raise TransportError(
                redact(
                    f"{what}: the broker at {mask_url(url)} refused ({type(exc).__name__}: {exc})"
                )
            ) from exc
        raise


def _unreachable(url: str, what: str, exc: BaseException) -> str:
    """The message of a failed connection: the TLS refusal if that is what it was."""
    refused = tls_failure(exc)
    if refused is not None:
        return redact(
            f"{what}: the TLS certificate of the broker at {mask_url(url)} was refused "
            f"({refused}). Trust the CA that signed it with TLSOptions(ca_file=...) "
            "(MQTASKS_TLS_CA_FILE) and connect by a host name the certificate lists."
        )
    return redact(
        f"{what}: cannot reach the broker at {mask_url(url)} ({type(exc).__name__}: {exc})"
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    import amqp.exceptions
    import redis.exceptions

    return (
        amqp.exceptions.ConnectionError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    )


def _channel_errors() -> tuple[type[BaseException], ...]:
    import amqp.exceptions
    import redis.exceptions
    from kombu.exceptions import KombuError

    return (amqp.exceptions.AMQPError, redis.exceptions.RedisError, KombuError)


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


class Transport:
    """Base class of mqtasks transports: kombu underneath, opaque bodies on top.

    Subclasses set :attr:`kombu_transport` and adjust queue arguments and the
    publish step to their broker. Publishing goes through a pool of connections
    and producers; consuming through a :class:`Consumer` that owns one connection.

    Args:
        url: The broker URL.
        settings: Connection and publishing settings.
    """

    #: URL schemes served by this transport.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: The kombu transport class (or alias) underneath.
    kombu_transport: Any = None
    #: Whether the broker itself returns unroutable messages and confirms publishes.
    confirms: ClassVar[bool] = False

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
        self._producers: pools.ProducerPool | None = None
        self._connections: Any = None
        self._declared: set[str] = set()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)}>"

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
                    producer_cls = _producer_factory(self._on_return if self.confirms else None)
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

    # -- topology ----------------------------------------------------------

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        """Return broker-side queue arguments for ``spec``.

        Raises:
            ConfigurationError: The broker cannot honour an option of ``spec``.
        """
        if spec.delivery_limit:
            raise ConfigurationError(
                f"Queue {spec.name!r}: {self.schemes[0]}:// does not count deliveries, so it "
                "cannot honour delivery_limit. Use redis:// or a RabbitMQ quorum queue, or "
                "remove delivery_limit from the queue config."
            )
        if spec.max_length is not None or spec.message_ttl is not None:
            raise ConfigurationError(
                f"Queue {spec.name!r}: max_length and message_ttl need a broker that enforces "
                f"them (RabbitMQ); {self.schemes[0]}:// does not. Remove them from the queue "
                "config or use amqp://."
            )
        return {}

    def kombu_queue(self, spec: QueueSpec) -> kombu.Queue:
        """Return the kombu queue for ``spec`` (bound to the default exchange)."""
        spec = broker_spec(spec)
        return kombu.Queue(
            spec.name,
            exchange=kombu.Exchange(""),
            routing_key=spec.name,
            durable=True,
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
        dead = [dead_letter_spec(s) for s in todo if not s.name.endswith(DLQ_SUFFIX)]
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

    def forget_declared(self) -> None:
        """Forget the declaration cache (after a queue was deleted behind our back)."""
        self._declared.clear()

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
        """
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        exchange, routing_key = self.route(queue, delay)
        pool = self._pool()
        try:
            nacked: Exception | None = None
            with pool.acquire(block=True, timeout=timeout) as producer:
                self._local.returned = None
                try:
                    self._publish(producer, exchange, routing_key, envelope, deadline)
                except Exception as exc:
                    if not _caused_by(exc, "MessageNacked"):
                        # Returned to the pool after an error, the connection would be
                        # closed politely, waiting seconds more for a broker that does
                        # not answer; drop it instead (the pool makes a new one).
                        with contextlib.suppress(Exception):
                            producer.connection.collect()
                        raise
                    # A nack leaves the connection as good as before; raised inside
                    # this block, kombu would close it and the next publish open another.
                    nacked = exc
                returned = self._local.returned
            if nacked is not None:
                raise nacked
        except PublishError:
            raise
        except Exception as exc:
            if _caused_by(exc, "MessageNacked"):  # py-amqp: a basic.nack for our message
                raise PublishNacked(
                    f"Task {envelope.message_id} was NOT enqueued: the broker refused it on "
                    f"{queue!r} (a full queue with overflow=reject-publish, or a broker alarm).",
                    task_id=envelope.message_id,
                ) from exc
            raise PublishError(
                redact(
                    f"Task {envelope.message_id} was NOT enqueued on {queue!r}: "
                    f"{type(exc).__name__}: {exc} (broker {mask_url(self.url)})"
                ),
                task_id=envelope.message_id,
            ) from exc
        if returned is not None:
            self._raise_returned(queue, envelope, returned)

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
            mandatory=self.confirms,
            retry=True,
            retry_policy=policy,
            timeout=remaining,
            confirm_timeout=remaining,
        )

    def publish_many(
        self, items: Sequence[tuple[str, Envelope]], *, timeout: float | None = None
    ) -> list[BaseException | None]:
        """Publish many messages; return, per item, None if the broker has it or the error.

        The base implementation publishes one by one; transports with publisher
        confirms override it to pipeline them.

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

    def check_broker(self) -> list[str]:
        """Return warnings about broker settings that weaken mqtasks' guarantees.

        Called once by a starting worker, which logs each. Transports override it.
        """
        return []

    # -- consuming ---------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` that owns its own connection."""
        return Consumer(self, specs, prefetch=prefetch)

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

        Raises:
            QueueNotFound: A queue does not exist (RabbitMQ; on Redis an absent
                queue is an empty one).
        """
        counts: dict[str, int] = {}
        with translate_errors(self.url, "count messages"), self.connection() as conn:
            for spec in specs:
                q = self.kombu_queue(spec).bind(conn.default_channel)
                try:
                    _, count, _ = q.queue_declare(passive=True)
                except Exception as exc:
                    if getattr(exc, "code", None) == 404:
                        raise QueueNotFound(f"Queue {spec.name!r} does not exist.") from exc
                    raise
                counts[spec.name] = int(count or 0)
        return counts

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return, per queue, how many messages the broker holds for a delay.

        Transports that cannot tell per queue (RabbitMQ's delay queues are shared)
        return an empty mapping.
        """
        return {}

    def queue_stats(self, specs: Sequence[QueueSpec]) -> dict[str, QueueStats]:
        """Return what the broker tells about each queue, by queue name.

        A queue that does not exist is reported with ``exists=False``, never
        raised. The base implementation counts ready, delayed and dead-lettered
        messages; transports that can tell more override it.

        Raises:
            ConnectionFailed: The broker cannot be reached.
            TransportError: The broker refused.
        """
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


def _caused_by(exc: BaseException | None, name: str) -> bool:
    """Whether ``exc`` or an exception in its cause chain has class name ``name``."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == name:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class _BoundProducerPool(pools.ProducerPool):  # type: ignore[misc]
    """A producer pool whose producers keep their connection and channel between uses.

    kombu's ``ProducerPool`` hands a producer's connection back to the connection
    pool on every release and binds it again on the next acquire (a connection
    from the pool, a channel promise, a copy of the exchange): about a fifth of
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


class Consumer:
    """Receives deliveries from queues over one connection owned by one thread.

    Every method must be called from the thread that drains the connection.
    After a reconnect, deliveries of the old connection are stale: settling
    them is skipped (the broker has already requeued them).

    Args:
        transport: The transport the consumer belongs to.
        specs: Queues to consume.
        prefetch: Most unacknowledged deliveries held at once.
    """

    def __init__(self, transport: Transport, specs: Sequence[QueueSpec], *, prefetch: int) -> None:
        self.transport = transport
        self.specs = list(specs)
        self.prefetch = prefetch
        self.generation = 0
        self._conn: kombu.Connection | None = None
        self._consumer: kombu.Consumer | None = None
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._cancelled = False
        self._interrupted = threading.Event()
        self._tags: dict[Any, str] = {}

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Connect, declare the queues and start consuming.

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        self._on_delivery = on_delivery
        self._connect(max_retries=self.transport.publish_retries)

    def _connect(self, max_retries: int | None) -> None:
        t = self.transport
        # The queues with their dead-letter queues and bindings: a worker must be able
        # to dead-letter what it takes even if no publisher ever declared them.
        t.forget_declared()
        t.declare(self.specs)
        conn = t.connection(heartbeat=t.heartbeat)
        with translate_errors(t.url, "connect consumer"):
            conn.ensure_connection(
                max_retries=max_retries,
                interval_start=0.2,
                interval_step=0.5,
                interval_max=5.0,
                errback=self._log_connect_error,
            )
            channel = conn.channel()
            queues = [t.kombu_queue(s).bind(channel) for s in self.specs]
            for q in queues:
                q.declare()
            self._consumer = kombu.Consumer(
                channel, queues=queues, no_ack=False, auto_declare=False
            )
            self._consumer.qos(prefetch_count=self.prefetch)
            self._consumer.on_message = self._receive
            self._consumer.consume()
            self._tags = {tag: name for name, tag in self._consumer._active_tags.items()}
        self._conn = conn
        self.generation += 1
        self._cancelled = False

    def _log_connect_error(self, exc: BaseException, interval: float) -> None:
        logger.warning(
            "broker.connect_failed",
            url=mask_url(self.transport.url),
            error=type(exc).__name__,
            retry_in=round(interval, 2),
        )

    def _receive(self, raw: KombuMessage) -> None:
        info = raw.delivery_info
        queue = self._tags.get(info.get("consumer_tag")) or info.get("routing_key") or ""
        assert self._on_delivery is not None
        count = self.transport.delivery_count(raw)
        self._on_delivery(Delivery(raw, queue, self.generation, count))

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean the connection is gone."""
        conn = self._conn or self.transport.connection()
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them.

        Reconnects (forever, with capped backoff) when the connection is lost.
        """
        if self._conn is None:
            self._reconnect()
            return
        try:
            self._conn.drain_events(timeout=timeout)
        except TimeoutError:
            pass
        except self.connection_errors as exc:
            self._lost(exc)
            return
        self.heartbeat_check()

    def _lost(self, exc: BaseException) -> None:
        logger.warning(
            "broker.connection_lost", url=mask_url(self.transport.url), error=type(exc).__name__
        )
        self._reconnect()

    #: Whether :meth:`wait` can be woken through a file descriptor.
    wakeable: ClassVar[bool] = False

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Wait up to ``timeout`` for deliveries or for ``wake_fd`` to become readable.

        Transports that cannot select on their connection (``wakeable`` False)
        only honour ``timeout``; callers then poll with short timeouts.
        """
        self.drain(timeout)

    def heartbeat_check(self) -> None:
        """Send and check heartbeats; reconnect if the broker went silent."""
        if self._conn is None or not self.transport.heartbeat:
            return
        try:
            self._conn.heartbeat_check()
        except self.connection_errors as exc:
            logger.warning("broker.heartbeat_missed", error=type(exc).__name__)
            self._reconnect()

    def interrupt(self) -> None:
        """Make a reconnect loop in progress give up (safe from any thread)."""
        self._interrupted.set()

    def _reconnect(self) -> None:
        self._drop()
        delay = 0.2
        # One attempt at a time rather than kombu's retry-forever, so that a
        # stopping worker is not held hostage by a broker that stays down.
        while not (self._cancelled or self._interrupted.is_set()):
            try:
                self._connect(max_retries=0)
            except TransportError as exc:
                logger.warning("broker.reconnect_failed", error=str(exc), retry_in=delay)
                self._interrupted.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            logger.info("broker.reconnected", url=mask_url(self.transport.url))
            return

    def _drop(self) -> None:
        conn, self._conn, self._consumer = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    def _settle(self, delivery: Delivery, action: Callable[[], None]) -> bool:
        if delivery.generation != self.generation or self._conn is None:
            return False  # stale: the broker requeued it when the old connection died
        try:
            action()
        except self.connection_errors as exc:
            logger.warning("broker.settle_failed", error=type(exc).__name__)
            self._reconnect()
            return False
        return True

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge: the message is done. Returns False if it was stale."""
        return self._settle(delivery, delivery.raw.ack)

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several deliveries (transports may coalesce the acks)."""
        for delivery in deliveries:
            self.ack(delivery)

    def reject(self, delivery: Delivery) -> bool:
        """Reject without requeue (the broker drops or dead-letters it)."""
        return self._settle(delivery, lambda: delivery.raw.reject(requeue=False))

    def requeue(self, delivery: Delivery) -> bool:
        """Hand the message back to the broker for another consumer."""
        return self._settle(delivery, lambda: delivery.raw.reject(requeue=True))

    def cancel(self) -> None:
        """Stop receiving new deliveries (basic.cancel); held ones stay settleable."""
        self._cancelled = True
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.cancel()

    def close(self) -> None:
        """Close the connection; unacknowledged deliveries go back to the broker."""
        self._cancelled = True
        conn, self._conn, self._consumer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # the connection may already be gone
                with contextlib.suppress(Exception):
                    conn.collect()
