"""The consumer of the ``redis://`` transport: atomic fetch-and-record into a
processing list per source queue, liveness beats, the restore sweep of dead
consumers, delayed-message promotion, and settlement batched into the next fetch."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import redis
import structlog

from ..._url import mask_url
from ..base import Consumer, Delivery, QueueSpec
from ..errors import translate_errors
from .element import RedisDelivery
from .scripts import BEAT, PROMOTE, RESTORE, SETTLE_FETCH

if TYPE_CHECKING:
    from . import RedisTransport

__all__ = ["CONNECTION_ERRORS", "RedisConsumer"]

logger = structlog.get_logger("mqtasks.transport.redis")

#: Errors that mean a Redis connection is gone (or Redis is frozen).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)

#: Bytes above which a settled element is sent on its own before the next fetch.
_LARGE_ELEMENT = 1024 * 1024


class _Source:
    """One queue a consumer takes from, with its blocking connection."""

    __slots__ = ("blocked_since", "conn", "conn_id", "index", "key", "queue")

    def __init__(self, index: int, queue: str, key: str) -> None:
        self.index = index
        self.queue = queue
        self.key = key
        self.conn: Any = None  # redis.Connection, created on first block
        self.conn_id: int | None = None
        self.blocked_since: float | None = None  # when BLMOVE was sent, until its reply


class RedisConsumer(Consumer):
    """Consumer whose in-flight records live in Redis, under a consumer id.

    The deliveries it holds belong to the consumer id, not to a TCP connection:
    after a reconnect they stay valid (their acks remove the records, so a
    connection blip causes no duplicate) and ``generation`` does not
    change. It changes only when a sweep restored this consumer's messages
    (an outage longer than ``liveness_ttl``); deliveries of the old generation
    are then stale and settling them does nothing, since others have them.

    Settlements are collected and sent with the next fetch, in one Lua call.
    Consuming several queues, a BLMOVE waits on each; if more answer at once
    than the prefetch window has room for, the extras go straight back to the
    head of their queue undelivered, so deliveries never exceed ``prefetch``.

    Queues added while consuming get the next source index; a removed queue
    keeps its index (and its processing list, registered for the sweeps) while
    the consumer id lives, so a held delivery of it stays settleable and the
    index is never given to another queue (a queue added again takes its old one).
    """

    wakeable: ClassVar[bool] = True

    def __init__(
        self, transport: RedisTransport, specs: Sequence[QueueSpec], *, prefetch: int
    ) -> None:
        super().__init__(transport, specs, prefetch=prefetch)
        self.rt = transport
        self.consumer_id = ""
        self._client: redis.Redis[bytes] | None = None
        #: The queues consumed now.
        self._sources = [
            _Source(i, s.name, transport.queue_key(s.name)) for i, s in enumerate(specs)
        ]
        #: Every source of this consumer id, by index: removed ones too.
        self._known = list(self._sources)
        self._sources_json = ""
        self._promote_keys: list[str] = []
        self._sources_changed()
        self._next_promote = 0.0
        self._held: dict[int, RedisDelivery] = {}
        self._pending: list[tuple[str, str, str, bytes]] = []  # action, proc, source, element
        self._dead_conn_ids: set[int] = set()
        self._unkilled = False
        self._next_beat = 0.0
        self._next_sweep = 0.0
        self._turn = 0
        self._settle_fetch: Any = None
        self._beat_script: Any = None
        self._restore: Any = None
        self._promote: Any = None

    def _sources_changed(self) -> None:
        # The registry lists every known source, so that a sweep or a close
        # restores the processing lists of removed queues as well.
        self._sources_json = json.dumps([s.key for s in self._known])
        self._promote_keys = [self.rt.delayed_key(s.queue) for s in self._sources] + [
            s.key for s in self._sources
        ]

    # -- connection --------------------------------------------------------

    def _new_consumer_id(self) -> None:
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def proc_key(self, source: _Source) -> str:
        """The processing list of ``source`` for the current consumer id."""
        return f"{self.rt.key_prefix}:proc:{self.consumer_id}:{source.index}"

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Register the consumer and start consuming.

        Raises:
            ConnectionFailed: Redis cannot be reached.
        """
        self._on_delivery = on_delivery
        self._new_consumer_id()
        with translate_errors(self.rt.url, "connect consumer"):
            self._open(first=True)

    def _open(self, *, first: bool) -> None:
        client = self.rt.client(single_connection=True)
        self._settle_fetch = client.register_script(SETTLE_FETCH)
        self._beat_script = client.register_script(BEAT)
        self._restore = client.register_script(RESTORE)
        self._promote = client.register_script(PROMOTE)
        self._client = client
        try:
            self._kill_dead_connections()
            if first:
                self._beat(strict=False)
                self.generation += 1
                self._next_sweep = 0.0
            elif not self._beat(strict=True):
                # A sweep gave our messages to others while we were away: start afresh.
                old = self.consumer_id
                self._restore(keys=[self.rt.registry_key], args=[self.rt.key_prefix, old, "1"])
                self._new_consumer_id()
                self._held.clear()
                # Nothing is held under the new id: removed queues' indexes go.
                self._known = list(self._sources)
                for i, source in enumerate(self._known):
                    source.index = i
                self._sources_changed()
                self._beat(strict=False)
                self.generation += 1
                logger.warning("redis.consumer_restored_while_away", consumer=old)
            else:
                self._flush_settlements()
                self._reconcile()
        except BaseException:
            self._client = None
            _close(client)
            raise
        self._cancelled = False

    def _kill_dead_connections(self) -> None:
        # A blocked BLMOVE of a connection we gave up on (half-open, or cut
        # while Redis has not noticed) could still move a message into our
        # processing list after we reconciled it; kill it first.
        if not self._dead_conn_ids or self._client is None:
            return
        for conn_id in list(self._dead_conn_ids):
            try:
                self._client.client_kill_filter(_id=str(conn_id))
            except redis.ResponseError as exc:
                if "no such client" not in str(exc).lower():
                    # CLIENT is forbidden to us: leave our registration for a sweep to clear.
                    self._unkilled = True
                    logger.warning("redis.client_kill_refused", error=str(exc))
            self._dead_conn_ids.discard(conn_id)

    def _beat(self, *, strict: bool = False) -> bool:
        """Refresh the liveness key; return whether the registration was still there."""
        assert self._client is not None
        ttl_ms = int(self.rt.liveness_ttl * 1000)
        existed = self._beat_script(
            keys=[self.rt.registry_key, self.rt.alive_key(self.consumer_id)],
            args=[self.consumer_id, ttl_ms, self._sources_json, "1" if strict else "0"],
        )
        self._next_beat = time.monotonic() + self.rt.liveness_ttl / 4
        return bool(existed)

    def _sweep(self) -> None:
        assert self._client is not None
        out = self._restore(keys=[self.rt.registry_key], args=[self.rt.key_prefix, "", "0"])
        interval = self.rt.sweep_interval
        self._next_sweep = time.monotonic() + interval * random.uniform(0.8, 1.2)
        if out and (int(out[0]) or len(out) > 1):
            logger.warning(
                "redis.consumers_restored",
                messages=int(out[0]),
                consumers=[c.decode(errors="replace") for c in out[1:]],
            )

    def _reconcile(self, only: _Source | None = None) -> None:
        """Return to their queues the messages recorded for us that we never got
        (a fetch whose reply was lost with the connection), of ``only`` or of every source."""
        assert self._client is not None
        self._flush_settlements()
        pipe = self._client.pipeline(transaction=False)
        sources = self._known if only is None else [only]
        for source in sources:
            pipe.lrange(self.proc_key(source), 0, -1)
        held = Counter((d.proc_key, d.element) for d in self._held.values())
        for source, elements in zip(sources, pipe.execute(), strict=True):
            proc = self.proc_key(source)
            for element in elements:  # newest first: the oldest ends up first in line
                if held[(proc, element)]:
                    held[(proc, element)] -= 1
                else:
                    self._pending.append(("u", proc, source.key, element))
        self._flush_settlements()

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean the connection is gone."""
        return CONNECTION_ERRORS

    def _lost(self, exc: BaseException) -> None:
        logger.warning(
            "broker.connection_lost", url=mask_url(self.rt.url), error=type(exc).__name__
        )
        self._reconnect()

    def _reconnect(self) -> None:
        self._drop()
        delay = 0.2
        while not (self._cancelled or self._interrupted.is_set()):
            try:
                self._open(first=False)
            except CONNECTION_ERRORS as exc:
                logger.warning("broker.reconnect_failed", error=type(exc).__name__, retry_in=delay)
                self._interrupted.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            logger.info("broker.reconnected", url=mask_url(self.rt.url))
            return

    def _drop(self) -> None:
        client, self._client = self._client, None
        for source in self._sources:
            self._drop_blocking(source)
        if client is not None:
            with contextlib.suppress(Exception):
                _close(client)

    def _drop_blocking(self, source: _Source) -> None:
        conn, source.conn, source.blocked_since = source.conn, None, None
        if source.conn_id is not None:
            self._dead_conn_ids.add(source.conn_id)
            source.conn_id = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    # -- consuming ---------------------------------------------------------

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them."""
        self.wait(timeout, -1)

    def heartbeat_check(self) -> None:
        """Refresh the liveness key (and sweep dead consumers) when due."""
        if self._client is None:
            return
        try:
            self._housekeeping()
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat and not self._beat(strict=True):
            raise redis.ConnectionError("consumer registration was swept")
        if now >= self._next_sweep:
            self._sweep()

    def _promote_due(self) -> None:
        """Move due delayed messages to their ready lists (when a check is due)."""
        if time.monotonic() < self._next_promote:
            return
        assert self._client is not None
        _, wait_ms = self._promote(keys=self._promote_keys, args=[self.rt.promote_batch])
        after = self.rt.delay_poll_interval * random.uniform(0.8, 1.0)
        if wait_ms >= 0:
            after = min(after, wait_ms / 1000)
        self._next_promote = time.monotonic() + after

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Settle, fetch what is ready, else sleep until a message, a wake-up or ``timeout``."""
        if self._client is None:
            if self._cancelled:  # shutting down without a connection: just let time pass
                if wake_fd >= 0:
                    select.select([wake_fd], [], [], timeout)
                else:
                    time.sleep(timeout)
                return
            self._reconnect()
            return
        try:
            self._housekeeping()
            self._promote_due()
            if self._fetch():
                return
            # A custom connection class (an in-process fake) may have no socket for
            # select(): poll instead; the wait below ends by the next promote check.
            blocked = self._block() if self.rt.connection_class is None else []
            fds: list[Any] = [s.conn._sock for s in blocked]
            if wake_fd >= 0:
                fds.append(wake_fd)
            now = time.monotonic()
            wait_for = max(0.0, min(timeout, self._next_beat - now, self._next_promote - now))
            ready = [s for s in blocked if _buffered(s.conn)]
            if not ready:
                if fds:
                    readable = select.select(fds, [], [], wait_for)[0]
                else:
                    self._interrupted.wait(wait_for)
                    readable = []
                ready = [s for s in blocked if s.conn._sock in readable]
            for source in ready:
                self._read_blocked(source)
            self._check_overdue()
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def _fetch(self) -> bool:
        """Send collected settlements and fetch up to the free window; True if any arrived."""
        free = 0 if self._cancelled else self.prefetch - len(self._held)
        idle = [s for s in self._sources if s.blocked_since is None]
        n = free - (len(self._sources) - len(idle))
        if n <= 0 or not idle:
            n, idle = 0, []
        if not self._pending and not n:
            return False
        if n and any(len(p[3]) > _LARGE_ELEMENT for p in self._pending):
            # Settle a large element before fetching more, so its bytes are freed
            # rather than held while the next (possibly large) element is read.
            self._flush_settlements()
        if idle:
            self._turn = (self._turn + 1) % len(idle)
            idle = idle[self._turn :] + idle[: self._turn]  # no queue starves the others
        out = self._call_settle_fetch(n, idle)
        for i in range(0, len(out), 2):
            self._deliver(idle[int(out[i])], out[i + 1])
        return bool(out)

    def _flush_settlements(self) -> None:
        if self._pending:
            self._call_settle_fetch(0, [])

    def _call_settle_fetch(self, n: int, sources: list[_Source]) -> list[Any]:
        pending, self._pending = self._pending, []
        keys: list[str] = []
        for s in sources:
            keys += (s.key, self.proc_key(s))
        keys += [p[1] for p in pending]
        keys += [p[2] for p in pending]
        args: list[Any] = [n, len(sources), len(pending)]
        args += [p[0] for p in pending]
        args += [p[3] for p in pending]
        try:
            out: list[Any] = self._settle_fetch(keys=keys, args=args)
        except BaseException:
            self._pending = pending + self._pending  # idempotent: sent again after reconnect
            raise
        return out

    def _deliver(self, source: _Source, element: bytes) -> None:
        delivery = RedisDelivery(
            element, source.queue, self.generation, self.proc_key(source), source.key
        )
        self._held[id(delivery)] = delivery
        assert self._on_delivery is not None
        self._on_delivery(delivery)

    def _block(self) -> list[_Source]:
        """Send BLMOVE on every idle queue if the window has room; return the blocked ones."""
        if not self._cancelled and len(self._held) < self.prefetch:
            for source in self._sources:
                if source.blocked_since is None:
                    self._send_blmove(source)
        return [s for s in self._sources if s.blocked_since is not None]

    def _send_blmove(self, source: _Source) -> None:
        if source.conn is None:
            conn = self.rt.pool_connection()
            conn.connect()
            conn.send_command("CLIENT", "ID")
            source.conn_id = int(conn.read_response())
            source.conn = conn
        source.conn.send_command(
            "BLMOVE", source.key, self.proc_key(source), "RIGHT", "LEFT", self.rt.block_timeout
        )
        source.blocked_since = time.monotonic()

    def _read_blocked(self, source: _Source) -> None:
        element = source.conn.read_response()
        source.blocked_since = None
        if element is None:
            return  # the server-side timeout: nothing arrived
        if self._cancelled or len(self._held) >= self.prefetch:
            # Several queues answered at once and the window is full: back to the head.
            self._pending.append(("u", self.proc_key(source), source.key, element))
            return
        self._deliver(source, element)

    def _check_overdue(self) -> None:
        limit = self.rt.block_timeout + max(5.0, self.rt.block_timeout)
        now = time.monotonic()
        for source in self._sources:
            if source.blocked_since is not None and now - source.blocked_since > limit:
                raise redis.TimeoutError(f"no reply to BLMOVE on {source.queue!r} in {limit} s")

    # -- settling ----------------------------------------------------------

    def _settle_later(self, delivery: Delivery, action: str) -> bool:
        if not isinstance(delivery, RedisDelivery) or delivery.generation != self.generation:
            return False  # stale: a sweep already returned it to the queue
        if self._held.pop(id(delivery), None) is None:
            return False  # settled already
        self._pending.append((action, delivery.proc_key, delivery.source_key, delivery.element))
        return True

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge (sent with the next fetch). Returns False if it was stale."""
        return self._settle_later(delivery, "a")

    def reject(self, delivery: Delivery) -> bool:
        """Drop the message."""
        return self._settle_later(delivery, "x")

    def requeue(self, delivery: Delivery) -> bool:
        """Put the message back at the head of its queue, marked redelivered."""
        return self._settle_later(delivery, "q")

    def requeue_ordered(self, deliveries: Sequence[Delivery]) -> None:
        """Put the deliveries back at the head of their queue, in the given order.

        Each requeue goes to the head, ahead of the one before: newest first, so
        the oldest ends first in line (the settlements run in this order, in one
        script with the next fetch).
        """
        for delivery in reversed(deliveries):
            self.requeue(delivery)

    # -- changing queues ---------------------------------------------------

    def add_queue(self, spec: QueueSpec) -> None:
        """Start taking from ``spec`` too (consumed already: nothing).

        The consumer's registration lists the new processing list before the
        first fetch from it, so a sweep restores what it holds if the consumer dies.

        Raises:
            ConfigurationError: Redis cannot honour an option of ``spec``.
        """
        if any(s.queue == spec.name for s in self._sources):
            return
        self.rt.declare([spec])
        self.specs.append(spec)
        source = next((s for s in self._known if s.queue == spec.name), None)
        if source is None:
            source = _Source(len(self._known), spec.name, self.rt.queue_key(spec.name))
            self._known.append(source)
        self._sources.append(source)
        self._sources_changed()
        self._next_promote = 0.0
        if self._client is None:
            return  # the next connect registers it
        try:
            if not self._beat(strict=True):
                raise redis.ConnectionError("consumer registration was swept")
            # A queue taken over from a consumer that died (an ordered task's
            # partition whose lease expired) gets what that consumer held back at
            # its head, in order, before the first fetch from it: once the lease
            # outlasts the liveness key (Transport.recovery_time), the sweep finds
            # the dead consumer expired.
            self._sweep()
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def remove_queue(self, name: str) -> None:
        """Stop taking from queue ``name``; held deliveries of it stay settleable.

        A BLMOVE waiting on the queue is cut (its connection killed), and a
        message it moved for us meanwhile goes back to the head of the queue.
        """
        self.specs = [s for s in self.specs if s.name != name]
        source = next((s for s in self._sources if s.queue == name), None)
        if source is None:
            return
        self._sources.remove(source)
        self._sources_changed()
        blocked = source.blocked_since is not None
        self._drop_blocking(source)
        if self._client is None or not blocked:
            return  # a reconnect reconciles every known processing list
        try:
            self._kill_dead_connections()
            self._reconcile(source)
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def cancel(self) -> None:
        """Stop fetching; messages moved for us but not delivered go back to their queues."""
        self._cancelled = True
        if self._client is None:
            return
        try:
            for source in self._sources:
                self._drop_blocking(source)
            self._kill_dead_connections()
            self._reconcile()
        except CONNECTION_ERRORS as exc:
            # Left in our processing lists: the sweep restores them once our liveness expires.
            logger.warning("broker.cancel_failed", error=type(exc).__name__)
            self._drop()

    def close(self) -> None:
        """Settle what is pending and hand every held message back to its queue."""
        self.cancel()
        if self._client is None and (self._pending or self._held):
            # The connection failed while cancelling: one more try, so that the
            # acks collected are sent rather than their messages delivered again
            # once our liveness expires.
            with contextlib.suppress(*CONNECTION_ERRORS):
                self._open(first=False)
            self._cancelled = True
        client = self._client
        if client is None:
            return
        try:
            self._flush_settlements()
            forget = "0" if self._unkilled else "1"  # a live BLMOVE may still move one
            out = self._restore(
                keys=[self.rt.registry_key], args=[self.rt.key_prefix, self.consumer_id, forget]
            )
            if out and int(out[0]):
                logger.info("redis.returned_at_close", messages=int(out[0]))
        except CONNECTION_ERRORS as exc:
            logger.warning("broker.close_failed", error=type(exc).__name__)
        finally:
            self._held.clear()
            self._drop()


def _close(client: redis.Redis[bytes]) -> None:
    """Close a consumer's client and its socket.

    ``Redis.close()`` only hands the connection back to a pool it was given,
    leaving the socket open until garbage collection; the pool is the
    client's own, so it is disconnected too.
    """
    try:
        client.close()
    finally:
        client.connection_pool.disconnect()


def _buffered(conn: Any) -> bool:
    """Whether a reply already sits in a TLS buffer that select() cannot see."""
    pending = getattr(conn._sock, "pending", None)
    return bool(pending and pending())
