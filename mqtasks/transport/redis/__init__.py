"""Redis with an atomic fetch: a message leaves its queue and is recorded as in
flight for one consumer in the same Redis operation, and the in-flight records
of consumers that died go back to the queue within seconds.

Written on redis-py directly, not on kombu's virtual transport: kombu's Redis
channel fetches with BRPOP and records the message as unacked in a second step
(a message popped for a connection that dies in between is lost), it restores
unacked messages only after ``visibility_timeout`` from a sweep in its poll
cycle, and its channel API has no place for a blocking atomic move (BLMOVE) or
a Lua script that settles and fetches in one call.

Layout, all keys under one hash tag (``{mqtasks}`` by default), so every script
touches a single slot:

* ``{p}:q:<queue>``: ready list; publishers LPUSH, consumers take from the right.
* ``{p}:q:<queue>#<k>``: ready list of the messages of priority level ``k`` (1
  to 9; see Priorities), present only while it holds some.
* ``{p}:proc:<consumer>:<i>``: in flight for one consumer, one list per source queue.
* ``{p}:alive:<consumer>``: liveness key with a TTL, refreshed by the consumer's I/O loop.
* ``{p}:consumers``: hash consumer id -> JSON list of its source queue keys.
* ``{p}:delayed:<queue>``: sorted set of elements held for a delay, scored by
  their due time (ms since the epoch on Redis' clock).
* ``{p}:x:<exchange>``: the bindings of a topic exchange (events), emitted to
  by one script (:mod:`~mqtasks.transport.redis.exchanges`).

Fetching: one Lua call settles the acks/rejects/requeues collected since the last
call and moves up to the free prefetch window (LMOVE per message) into the
processing lists. When the queues are empty the consumer sends BLMOVE on one
blocking connection per queue and sleeps in ``select()`` on those sockets and
the worker's wake-up pipe (``wakeable``). This costs less client CPU and
fewer commands per message than a BLMOVE + LREM per message or Redis Streams
(``benchmarks/README.md`` has the comparison). Streams were also
ruled out because XREADGROUP's COUNT applies per stream (a prefetch bound over several
queues cannot hold), a message cannot go back to the head of a stream, and
pending entries of a dead consumer are recovered only by claiming.

Delays (countdowns, retries): a delayed publish is one script that adds the
element to the queue's delayed set at Redis' ``TIME`` plus the delay, so client
clocks do not matter. Every consumer of the queue runs a second script from its
I/O loop, every ``delay_poll_interval`` (0.1 s, jittered) and exactly when the
earliest held element falls due (the script returns how long until then, and
the consumer's ``select()`` sleeps no longer): it moves due elements, earliest
first, to the tail of the ready list of their priority level in the same
atomic step. Whichever
consumer runs it first moves them; one that dies mid-move loses nothing. A
short delay never waits behind a long one, and held messages are in Redis
only: they survive worker restarts and no worker holds them in memory. A queue
with no consumer keeps its due messages held until one starts.

Element format: one flag byte (``n`` new, ``r`` redelivered), the number of
earlier deliveries that ended without a settlement in decimal (absent while
there are none), a compact JSON object (message id, headers, content type and
encoding, priority and, only where the queue lowered it, the priority level),
a newline, then the body bytes unchanged.

Priorities (0 to 9, higher first, as on RabbitMQ; above 9 counts as 9, and
above a queue's ``max_priority`` as that): a message of priority 0 or none
goes to the queue's list, exactly as without priorities, and one of level
``k`` to the list ``#k``. A fetch takes from the highest non-empty level
first, oldest first within one; a queue with no message at a level fetches as
if priorities did not exist (one EXISTS more in the script). Consumers block
in BLMOVE on the queue's own list only, not on ten: the scripts that add to a
level list (publish, promote, restore, requeue) also move the next message of
the highest level into the queue's list when it is empty, so a blocked
consumer gets it at once, and move it back to its level's head when more
messages arrive (``scripts``). So the queue's list holds at most one
message of a higher level, at its consumption end. A message's level is
written in its element (its priority, or the level a ``max_priority`` lowered
it to), so a delayed message, a requeued one and one restored from a dead
consumer go back to their own level; the one processing list per source
queue stays as it was. A priority publish is one script call (the plain one
an LPUSH), so a task still costs three commands at most: publish, fetch (or
the BLMOVE that blocked for it) and the settle-and-fetch call that acks it.
Among messages that arrive while a consumer is between a fetch and its
BLMOVE, one may be delivered before a higher one, which then waits for the
next fetch or at most ``delay_poll_interval`` (every consumer's promote check
also wakes its queues).

Delivery counts (``delivery_limit``) live in the element itself: the restore
script, which hands back the messages of a consumer that died or closed
holding them, rewrites ``r`` plus the count plus one, in the same step that
moves them (it copies the element anyway). A requeue of a message never
started keeps its count. So counting costs no command on the fetch, ack or
dead-letter path, nothing is left to clean up when a message is acked,
purged or deleted, and two messages with the same id are counted apart.

Not supported here: ``message_ttl`` and ``max_length``; each is a
ConfigurationError. Redis persistence decides durability (``appendonly yes``);
behind Sentinel (``redis+sentinel://``, ``mqtasks._redis_sentinel``) a
failover can drop writes not yet replicated, unless ``durability="replicated"``
(:mod:`~mqtasks.transport.redis.publishing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..._redis_sentinel import connection_pool, is_sentinel_url
from ..._url import mask_url
from ...exceptions import ConfigurationError, PublishError
from ..base import (
    DLQ_SUFFIX,
    Capabilities,
    Consumer,
    QueueSpec,
    QueueStats,
    StoredMessage,
    Taken,
    Transport,
)
from ..envelope import Envelope
from ..stream import StreamStore
from . import exchanges, publishing, queues
from .checks import redis_warnings, replication_warnings
from .consumer import RedisConsumer
from .element import MAX_LEVEL, RedisDelivery, encode_element, priority_level
from .scripts import DELAY, PUBLISH

__all__ = ["RedisConsumer", "RedisDelivery", "RedisTransport", "encode_element"]

logger = structlog.get_logger("mqtasks.transport.redis")

T = TypeVar("T")

_OPTIONS = (
    "key_prefix",
    "liveness_ttl",
    "sweep_interval",
    "block_timeout",
    "delay_poll_interval",
    "connection_class",
)


class RedisTransport(Transport):
    """Redis with atomic fetch-and-record, liveness-based restore and no
    visibility timeout: a long task of a live worker is never delivered twice.

    ``redis://`` and ``rediss://`` select it, and ``redis+sentinel://`` and
    ``rediss+sentinel://`` for Redis behind Sentinel (``redis+kombu://`` selects
    kombu's stock Redis transport instead). Options
    (``transport_options``): ``key_prefix`` (``{mqtasks}``), ``liveness_ttl``
    (10 s: how long a silent consumer keeps its messages), ``sweep_interval``
    (5 s), ``block_timeout`` (5 s: server-side BLMOVE timeout),
    ``delay_poll_interval`` (0.1 s: how often a consumer looks for newly due
    delayed messages; a delay shorter than this may be late by up to it),
    ``connection_class`` (None: the one the URL selects; a redis-py connection
    class, such as fakeredis' for :func:`mqtasks.testing.fake_redis_app`. Its
    consumers poll every ``delay_poll_interval`` instead of blocking in BLMOVE).

    Message priorities 0 to 9 run higher first on every queue, as on RabbitMQ;
    higher values count as 9, and as the queue's ``max_priority`` when it is
    lower (a queue's ``max_priority`` is known to the transports that declared
    or consume the queue; apps declare theirs before publishing).

    Redis has no publisher confirms: a publish returns when Redis has executed
    the LPUSH; with ``durability="replicated"`` only once ``WAIT 1`` reports a
    replica holds it too (:mod:`~mqtasks.transport.redis.publishing`). Messages of the kombu-based ``redis+kombu://`` transport live in other
    keys; drain them before switching.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
    capabilities = Capabilities(
        delays=True,
        priorities=True,
        max_priority=True,
        delivery_count=True,
        dead_letter_browse=True,
        exchanges=True,
        expiring_queues=True,
        streams=True,
    )

    def __init__(self, url: str, *, durability: str = "local", **options: Any) -> None:
        super().__init__(url, **options)
        #: ``replicated``: a publish returns once a replica holds the message (``WAIT 1``).
        self.durability = publishing.check_durability(durability)
        if ";" in url:
            # redis-py would read the rest of the list as the database path.
            raise ConfigurationError(
                f"{mask_url(url)}: a ';' failover list is not supported on Redis; "
                "give one URL (use Redis Sentinel or a managed endpoint for failover)."
            )
        opts = self.transport_options
        unknown = sorted(set(opts) - set(_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"Unknown transport option(s) {unknown} for {urlsplit(url).scheme}://; "
                f"known: {list(_OPTIONS)}."
            )
        self.key_prefix: str = str(opts.get("key_prefix", "{mqtasks}"))
        self.liveness_ttl = float(opts.get("liveness_ttl", 10.0))
        self.sweep_interval = float(opts.get("sweep_interval", 5.0))
        self.block_timeout = float(opts.get("block_timeout", 5.0))
        self.delay_poll_interval = float(opts.get("delay_poll_interval", 0.1))
        if (
            self.liveness_ttl < 1
            or self.sweep_interval <= 0
            or self.block_timeout <= 0
            or not 0 < self.delay_poll_interval <= 60
        ):
            raise ConfigurationError(
                "liveness_ttl must be at least 1 s; sweep_interval and block_timeout positive; "
                "delay_poll_interval above 0 and at most 60 s."
            )
        connection_class = opts.get("connection_class")
        if connection_class is not None and (
            self.uses_tls
            or is_sentinel_url(url)
            or not isinstance(connection_class, type)
            or not issubclass(connection_class, redis.connection.AbstractConnection)
        ):
            raise ConfigurationError(
                f"Transport option connection_class={connection_class!r}: give a redis-py "
                "connection class (such as fakeredis.FakeRedisConnection) with a redis:// "
                "URL; rediss:// and Sentinel URLs keep their own connection classes."
            )
        self.connection_class: type[redis.connection.AbstractConnection] | None = connection_class
        parts = urlsplit(url)
        self.redis_url = (
            url
            if is_sentinel_url(url)
            else urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))
        )
        self.registry_key = f"{self.key_prefix}:consumers"
        self._streams: StreamStore | None = None
        self._publisher: redis.Redis[bytes] | None = None
        self._scripts: dict[str, Any] = {}
        self._max_priority: dict[str, int] = {}

    #: Most delayed messages one consumer moves per queue in one script call.
    promote_batch: ClassVar[int] = 500

    def queue_key(self, queue: str) -> str:
        """The ready list of ``queue`` (of its messages of priority 0 or none)."""
        return f"{self.key_prefix}:q:{queue}"

    def level_key(self, queue: str, level: int) -> str:
        """The ready list of ``queue``'s messages of priority ``level`` (``queue_key`` for 0)."""
        key = self.queue_key(queue)
        return f"{key}#{level}" if level else key

    def ready_keys(self, queue: str) -> list[str]:
        """The ready lists of ``queue``, one per priority level from 0 to 9."""
        return [self.level_key(queue, k) for k in range(MAX_LEVEL + 1)]

    def delayed_key(self, queue: str) -> str:
        """The sorted set of ``queue``'s messages held for a delay."""
        return f"{self.key_prefix}:delayed:{queue}"

    def alive_key(self, consumer_id: str) -> str:
        """The liveness key of a consumer."""
        return f"{self.key_prefix}:alive:{consumer_id}"

    def processing_key(self, consumer_id: str, index: int) -> str:
        """The in-flight list of a consumer for its ``index``-th source queue."""
        return f"{self.key_prefix}:proc:{consumer_id}:{index}"

    # -- connections -------------------------------------------------------

    def _pool(self, **overrides: Any) -> redis.ConnectionPool:
        kwargs: dict[str, Any] = {
            "socket_timeout": self.publish_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),  # retries are ours: with a deadline, or a reconnect
        }
        if self.connection_class is not None:
            kwargs["connection_class"] = self.connection_class
        kwargs.update(overrides)
        return connection_pool(self.redis_url, tls=self.tls, **kwargs)

    def client(self, *, single_connection: bool = False) -> redis.Redis[bytes]:
        """Return a new client (one connection for a consumer's commands)."""
        return redis.Redis(connection_pool=self._pool(), single_connection_client=single_connection)

    def pool_connection(self) -> Any:
        """Return a new unconnected connection, for a consumer's blocking BLMOVE."""
        return self._pool().make_connection()

    def publisher(self) -> redis.Redis[bytes]:
        """The shared, thread-safe publishing client."""
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    pool = self._pool(max_connections=self.pool_size)
                    self._publisher = redis.Redis(connection_pool=pool)
        return self._publisher

    def close(self) -> None:
        """Close the publishing connections."""
        with self._lock:
            publisher, self._publisher = self._publisher, None
            self._scripts.clear()
            self._declared.clear()
        if publisher is not None:
            publisher.close()
            publisher.connection_pool.disconnect()

    @property
    def recovery_time(self) -> float:
        """The liveness TTL: a silent consumer's messages are restored once it expires."""
        return self.liveness_ttl

    def check_broker(self) -> list[str]:
        """Warn when Redis would lose or evict acknowledged tasks."""
        view = SimpleNamespace(default_channel=SimpleNamespace(client=self.publisher()))
        warnings = redis_warnings(lambda: contextlib.nullcontext(view))
        return warnings + replication_warnings(
            self.publisher(), self.durability, is_sentinel_url(self.url)
        )

    # -- topology ----------------------------------------------------------

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        """Check that ``spec`` asks for nothing this transport lacks
        (``delivery_limit`` is counted in the elements, ``max_priority`` caps
        the priority level messages are queued at).

        Raises:
            ConfigurationError: ``message_ttl`` or ``max_length`` is set.
        """
        return super().queue_arguments(dataclasses.replace(spec, delivery_limit=None))

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Check the queue options and remember each queue's ``max_priority``;
        Redis lists need no declaration."""
        for spec in specs:
            self.queue_arguments(spec)
        self._remember_max_priority(specs)
        self._declared.update(s.name for s in specs)

    def _remember_max_priority(self, specs: Sequence[QueueSpec]) -> None:
        for spec in specs:
            if spec.max_priority is None:
                self._max_priority.pop(spec.name, None)
            else:
                self._max_priority[spec.name] = spec.max_priority

    def _level(self, queue: str, priority: int | None) -> int:
        """The priority level a message of ``priority`` is queued at in ``queue``."""
        if queue.endswith(DLQ_SUFFIX):
            return 0  # dead letters stay in one list, read oldest first (browse, take)
        return priority_level(priority, self._max_priority.get(queue))

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return the number of ready messages per queue, all priority levels
        together (an absent queue is empty).

        Messages held for a delay are not ready: see :meth:`delayed_counts`.
        """
        return queues.message_counts(self, specs)

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return, per queue, how many messages Redis holds for a delay (due or not)."""
        return queues.delayed_counts(self, specs)

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Read each queue's lists, delayed set, dead-letter list, in-flight lists
        and live consumers (``redis.queues.queue_stats``)."""
        return queues.queue_stats(self, specs)

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove all ready (of every priority) and delayed messages from the
        queues; return how many."""
        return queues.purge(self, specs)

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues (their ready messages of every priority and delayed ones;
        in-flight ones return to a new list)."""
        queues.delete(self, specs)

    # -- publishing --------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """LPUSH ``envelope`` to ``queue``, or hold it in Redis for ``delay`` seconds;
        return once Redis executed it.

        Args:
            queue: Destination queue.
            envelope: What to send.
            timeout: Seconds to wait in all; ``publish_timeout`` by default.
            delay: Seconds Redis holds the message (timed on Redis' clock) before
                it joins ``queue``; None or <= 0: now. Publishing an identical
                envelope again while it is held stores it once, at its first due time.

        Raises:
            PublishError: Redis did not take it within ``timeout`` (it may still
                have, if the reply was lost: publish again with the same id), or
                ``delay`` is not a finite number.
        """
        element, level = self._encode(queue, envelope)
        delay_ms = self._delay_ms(queue, envelope, delay)
        self.run_publish(
            lambda client: self._send(client, queue, element, level, delay_ms),
            envelope,
            repr(queue),
            timeout,
        )

    def run_publish(
        self,
        send: Callable[[redis.Redis[bytes]], T],
        envelope: Envelope,
        where: str,
        timeout: float | None = None,
    ) -> T:
        """Run ``send`` on the publishing client, again after a lost connection, within ``timeout``.

        Args:
            send: One publishing command (or script call) and its reply.
            envelope: The message sent, for errors.
            where: Its destination as error messages name it.
            timeout: Seconds in all; ``publish_timeout`` by default.

        Raises:
            PublishError: Redis did not take it within ``timeout`` (it may still
                have, if the reply was lost) or refused it (a wrong key type,
                out of memory under ``noeviction``, ACLs); with ``replicated``
                durability also when no replica acknowledged it in time.
        """
        return publishing.run_publish(self, send, envelope, where, timeout)

    #: Messages sent in one pipeline by :meth:`publish_many`.
    chunk: ClassVar[int] = 500

    def publish_many(
        self,
        items: Sequence[tuple[str, Envelope]],
        *,
        timeout: float | None = None,
        delays: Sequence[float | None] | None = None,
    ) -> list[BaseException | None]:
        """LPUSH many messages, pipelined in chunks; return None or the error per item.

        A chunk cut off by a connection error reports every message in it as
        failed, though some may be enqueued; they are not sent again, to avoid
        duplicating a whole chunk. With ``replicated`` durability a chunk ends
        with ``WAIT 1``, and every message of a chunk no replica acknowledged fails.

        Args:
            items: ``(queue, envelope)`` pairs.
            timeout: Unused: the publishing client's socket timeout bounds each chunk.
            delays: Per item, seconds Redis holds it (as :meth:`publish`'s ``delay``).
        """
        return publishing.publish_many(self, items, delays)

    def _send(
        self, client: Any, queue: str, element: bytes, level: int, delay_ms: str | None
    ) -> None:
        """LPUSH ``element`` to the ready list of its priority ``level``, or add it to
        the delayed set (on a client or a pipeline): one command either way."""
        if delay_ms is not None:
            self._script(DELAY)(
                keys=[self.delayed_key(queue)], args=[delay_ms, element], client=client
            )
        elif level == 0:
            client.lpush(self.queue_key(queue), element)
        else:
            keys = [self.queue_key(queue), self.level_key(queue, level)]
            self._script(PUBLISH)(keys=keys, args=[element], client=client)

    def _script(self, source: str) -> Any:
        """The script ``source`` (registered once per publishing client)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.publisher().register_script(source)
        return script

    @staticmethod
    def _delay_ms(queue: str, envelope: Envelope, delay: float | None) -> str | None:
        """``delay`` in milliseconds for the delay script; None to publish now."""
        if delay is None:
            return None
        if not math.isfinite(delay):
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: "
                f"the delay must be a finite number of seconds, not {delay!r}.",
                task_id=envelope.message_id,
            )
        return None if delay <= 0 else repr(float(delay) * 1000)

    def _encode(self, queue: str, envelope: Envelope) -> tuple[bytes, int]:
        """Return ``envelope``'s element and its priority level in ``queue``."""
        level = self._level(queue, envelope.priority)
        try:
            return encode_element(envelope, level), level
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: headers must be "
                f"JSON values on this transport ({exc}).",
                task_id=envelope.message_id,
            ) from exc

    # -- topic exchanges (events) ----------------------------------------------

    def bind(self, exchange: str, pattern: str, spec: QueueSpec) -> None:
        """Check ``spec`` as :meth:`declare` does and store the binding in Redis
        (with the queue's ``max_priority``, which emits respect)."""
        exchanges.bind(self, exchange, pattern, spec)

    def unbind(self, exchange: str, pattern: str, queue: str) -> None:
        """Remove the binding from Redis (an absent one: nothing)."""
        exchanges.unbind(self, exchange, pattern, queue)

    def bindings(self, exchange: str) -> list[tuple[str, str]]:
        """Return the ``(pattern, queue)`` bindings Redis holds for ``exchange``, sorted."""
        return exchanges.bindings(self, exchange)

    def emit(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = True
    ) -> int:
        """Push ``envelope`` into every matching queue in one atomic script; return how many.

        One ``EVALSHA`` from the client; see :func:`~mqtasks.transport.redis.exchanges.emit`.

        Raises:
            Unroutable: ``mandatory`` and no binding matches.
            PublishError: Redis refused (nothing was pushed) or did not answer in time.
        """
        return exchanges.emit(self, exchange, routing_key, envelope, mandatory)

    # -- reading queues without a consumer -------------------------------------

    def browse(self, queue: str, limit: int | None = None) -> list[StoredMessage]:
        """Read up to ``limit`` messages of ``queue`` with ``LRANGE``, oldest first, untouched."""
        return queues.browse(self, queue, limit)

    def take(self, queue: str) -> contextlib.AbstractContextManager[Iterator[Taken]]:
        """Read ``queue``'s messages oldest first; removing one is an ``LREM`` of its element."""
        return queues.take(self, queue)

    # -- consuming ---------------------------------------------------------

    def streams(self) -> StreamStore:
        """Return this broker's Redis Streams (``mqtasks.transport.redis.streams``)."""
        from .streams import RedisStreams

        if self._streams is None:
            self._streams = RedisStreams(self)
        return self._streams

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` with its own connections."""
        for spec in specs:
            self.queue_arguments(spec)
        self._remember_max_priority(specs)  # for the retries a worker publishes
        return RedisConsumer(self, specs, prefetch=prefetch)
