"""SQLite as the broker (``sqlite:///path/to/tasks.db``): durable tasks on one
machine with no server, shared by every process that opens the same file (a
worker and the web app that publishes to it).

Hand-written on the standard library's :mod:`sqlite3`: no well-kept library
offers a SQLite task queue with leases, delays and dead letters that fits
mqtasks' transport interface (kombu's SQLAlchemy transport polls a table
without leases, so a killed worker's message is lost or, with a visibility
timeout, run twice while it still runs; huey's SQLite storage has no leases,
no delivery counts and no dead letters), and this needs no dependency.

* Messages are rows of one table (:mod:`.database`); a publish is one
  committed ``INSERT``, so it survives a crash of any process once
  :meth:`SqliteTransport.publish` returns (and, with the default
  ``synchronous=FULL``, a power cut).
* A delay is the row's ``run_at``: consumers claim nothing before it.
* A claim leases rows to one consumer (``locked_until``, ``locked_by``) in
  one ``BEGIN IMMEDIATE`` transaction: two processes never claim one row. The
  lease is renewed while the task runs; a killed worker's rows come back when
  it ends, with their delivery count (``returns``) raised, so ``delivery_limit``
  dead-letters a message that keeps killing its workers.
* Dead letters are rows of ``<queue>.dlq``, read in place by ``mqtasks dlq``.
* WAL mode: readers do not wait for the writer; writers queue on the write
  lock for up to ``busy_timeout`` seconds.

Not supported (``Capabilities``): topic exchanges (events), broadcast queues
that expire, ``max_length``, ``message_ttl`` and single-active-consumer
queues; asking for them raises ConfigurationError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from ...exceptions import ConfigurationError, PublishError, TransportError
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
from ..queue import published_at
from . import queues
from .consumer import LocalWakeups, SqliteConsumer, SqliteDelivery
from .database import (
    connect,
    database_path,
    immediate,
    translate_sqlite,
    url_options,
)

__all__ = ["SqliteConsumer", "SqliteDelivery", "SqliteTransport"]

#: Transport options and their defaults (also read from the URL's query string).
DEFAULTS: dict[str, Any] = {
    "lease": 30.0,
    "busy_timeout": 10.0,
    "synchronous": "FULL",
    "poll_interval": 0.01,
    "max_poll_interval": 0.2,
}

#: Highest priority level: priorities 0 to 9 are kept apart, higher ones count as 9.
MAX_LEVEL = 9

_INSERT = (
    "INSERT INTO mqtasks_messages (queue, message_id, headers, content_type, "
    "content_encoding, priority, level, body, published_at, run_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteTransport(Transport):
    """Tasks in a SQLite file (``sqlite:///tasks.db`` relative to the current
    directory, ``sqlite:////var/lib/app/tasks.db`` absolute).

    Transport options (``transport_options``, or the URL's query string,
    ``sqlite:///tasks.db?lease=60``):

    * ``lease`` (30 s): how long a claimed message stays with its consumer
      without a renewal; renewed each third of it while the task runs, so a
      killed worker's tasks run again within this time.
    * ``busy_timeout`` (10 s): how long a statement waits for the write lock.
    * ``synchronous`` (``FULL``): SQLite's ``PRAGMA synchronous``; ``NORMAL``
      is faster and loses the last commits only on a power cut or OS crash.
    * ``poll_interval`` (0.01 s) and ``max_poll_interval`` (0.2 s): an idle
      consumer looks for messages published by other processes after a sleep
      that doubles from the first to the second.
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite",)
    capabilities = Capabilities(
        delays=True,
        priorities=True,
        max_priority=True,
        delivery_count=True,
        dead_letter_browse=True,
    )

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.path = database_path(url)
        opts = {**url_options(url), **self.transport_options}
        unknown = sorted(set(opts) - set(DEFAULTS))
        if unknown:
            raise ConfigurationError(
                f"Unknown transport option(s) {unknown} for sqlite://; known: {list(DEFAULTS)}."
            )
        values = {**DEFAULTS, **opts}
        try:
            self.lease = float(values["lease"])
            self.busy_timeout = float(values["busy_timeout"])
            self.poll_interval = float(values["poll_interval"])
            self.max_poll_interval = float(values["max_poll_interval"])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"sqlite:// transport options must be numbers: {exc}") from exc
        self.synchronous = str(values["synchronous"]).upper()
        if (
            not 1 <= self.lease <= 86400
            or not 0 < self.busy_timeout <= 600
            or not 0 < self.poll_interval <= self.max_poll_interval <= 10
            or self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA")
        ):
            raise ConfigurationError(
                "sqlite:// options: lease 1 to 86400 s, busy_timeout above 0 and at most "
                "600 s, 0 < poll_interval <= max_poll_interval <= 10 s, synchronous one of "
                f"OFF, NORMAL, FULL, EXTRA; got {values!r}."
            )
        self._pool: list[sqlite3.Connection] = []
        self._pool_pid = os.getpid()
        self._max_priority: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<SqliteTransport {self.path}>"

    # -- connections -------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """Open a new connection to the file (WAL mode, the table created).

        Raises:
            ConfigurationError: The file cannot be written.
            ConnectionFailed: SQLite cannot open it.
        """
        return connect(
            self.path, self.url, busy_timeout=self.busy_timeout, synchronous=self.synchronous
        )

    @contextlib.contextmanager
    def pooled(self, what: str) -> Iterator[sqlite3.Connection]:
        """A pooled connection, with sqlite3's errors translated."""
        with self._lock:
            if self._pool_pid != os.getpid():
                # Forked (a worker's child process): a SQLite connection must not be
                # used across a fork; the parent's stay with the parent, unclosed.
                self._pool, self._pool_pid = [], os.getpid()
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self.connect()
        try:
            with translate_sqlite(self.path, what):
                yield conn
        except BaseException:
            conn.close()  # it may be in a state we do not know
            raise
        with self._lock:
            if len(self._pool) < self.pool_size:
                self._pool.append(conn)
                conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close the pooled connections."""
        with self._lock:
            pool, self._pool = self._pool, []
            self._declared.clear()
        for conn in pool:
            conn.close()

    def wake_local(self) -> None:
        """Wake this process's consumers of the file (a publish, a requeue)."""
        LocalWakeups.notify(self.path)

    @property
    def recovery_time(self) -> float:
        """The lease: a killed consumer's messages come back once it ends."""
        return self.lease

    def check_broker(self) -> list[str]:
        """Warn when commits may be lost on a power cut."""
        if self.synchronous in ("OFF", "NORMAL"):
            return [
                f"sqlite:// synchronous={self.synchronous}: tasks published (and acks) in the "
                "last moments before a power cut or OS crash may be lost; FULL (the "
                "default) keeps every commit."
            ]
        return []

    # -- topology ----------------------------------------------------------

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Check the queue options and remember each queue's ``max_priority``;
        the file and its table are created on first use."""
        for spec in specs:
            self.queue_arguments(spec)
            if spec.max_priority is None:
                self._max_priority.pop(spec.name, None)
            else:
                self._max_priority[spec.name] = spec.max_priority
        self._declared.update(s.name for s in specs)

    def _level(self, queue: str, priority: int | None) -> int:
        """The priority level a message of ``priority`` is claimed at in ``queue``."""
        if queue.endswith(DLQ_SUFFIX) or not priority or priority < 0:
            return 0
        return min(priority, self._max_priority.get(queue, MAX_LEVEL), MAX_LEVEL)

    # -- publishing --------------------------------------------------------

    def _row(self, queue: str, envelope: Envelope, delay: float | None) -> tuple[Any, ...]:
        if delay is not None and not math.isfinite(delay):
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: the delay must "
                f"be a finite number of seconds, not {delay!r}.",
                task_id=envelope.message_id,
            )
        try:
            headers = json.dumps(dict(envelope.headers), separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: headers must be "
                f"JSON values on this transport ({exc}).",
                task_id=envelope.message_id,
            ) from exc
        now = time.time()
        return (
            queue,
            envelope.message_id,
            headers,
            envelope.content_type,
            envelope.content_encoding,
            envelope.priority,
            self._level(queue, envelope.priority),
            bytes(envelope.body),
            published_at(envelope.headers),
            now + max(0.0, delay or 0.0),
        )

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Insert ``envelope`` into ``queue`` (held until ``delay`` seconds from now);
        return once the insert is committed.

        ``timeout`` is not used: a publish waits at most ``busy_timeout`` for
        the write lock.

        Raises:
            PublishError: SQLite did not take it (locked past ``busy_timeout``,
                disk full), or ``delay`` is not a finite number.
        """
        [error] = self._insert([self._row(queue, envelope, delay)], [envelope], repr(queue))
        if error is not None:
            raise error

    def publish_many(
        self,
        items: Sequence[tuple[str, Envelope]],
        *,
        timeout: float | None = None,
        delays: Sequence[float | None] | None = None,
    ) -> list[BaseException | None]:
        """Insert many messages in one transaction: all are enqueued, or none.

        Args:
            items: ``(queue, envelope)`` pairs.
            timeout: Unused: each waits at most ``busy_timeout`` for the write lock.
            delays: Per item, seconds it is held (as :meth:`publish`'s ``delay``).
        """
        rows: list[tuple[Any, ...] | None] = []
        results: list[BaseException | None] = []
        for n, (queue, envelope) in enumerate(items):
            try:
                rows.append(self._row(queue, envelope, delays[n] if delays else None))
                results.append(None)
            except PublishError as exc:
                rows.append(None)
                results.append(exc)
        good = [(n, r) for n, r in enumerate(rows) if r is not None]
        if good:
            [error] = self._insert(
                [r for _, r in good], [items[n][1] for n, _ in good], "several queues"
            )
            for n, _ in good:
                results[n] = error
        return results

    def _insert(
        self, rows: Sequence[tuple[Any, ...]], envelopes: Sequence[Envelope], where: str
    ) -> list[PublishError | None]:
        """Insert ``rows`` in one transaction; return ``[None]``, or ``[the error]`` of all."""
        try:
            with self.pooled("publish") as conn, immediate(conn):
                conn.executemany(_INSERT, rows)
        except TransportError as exc:  # ConfigurationError (the file cannot be written) passes
            first = envelopes[0].message_id
            error = PublishError(f"Task {first} was NOT enqueued on {where}: {exc}", task_id=first)
            error.__cause__ = exc
            return [error]
        self.wake_local()
        return [None]

    # -- consuming ---------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` with a connection of its own."""
        self.declare(specs)
        return SqliteConsumer(self, specs, prefetch=prefetch)

    def return_expired(self, conn: sqlite3.Connection) -> int:
        """Return to their queues the rows whose lease ended (their consumer died or
        stalled), counting a delivery each, and forget consumers gone silent; return
        how many rows came back."""
        now = time.time()
        found = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM mqtasks_messages WHERE locked_until < ?), "
            "EXISTS (SELECT 1 FROM mqtasks_consumers WHERE alive_until < ?)",
            (now, now),
        ).fetchone()
        if not any(found):
            return 0
        with immediate(conn):
            cursor = conn.execute(
                "UPDATE mqtasks_messages SET locked_until = NULL, locked_by = NULL, "
                "returns = returns + 1, redelivered = 1 WHERE locked_until < ?",
                (now,),
            )
            conn.execute("DELETE FROM mqtasks_consumers WHERE alive_until < ?", (now,))
        return cursor.rowcount

    # -- reading queues ----------------------------------------------------

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return the number of ready messages per queue (an absent queue is empty).

        Messages held for a delay are not ready: see :meth:`delayed_counts`.
        """
        return queues.message_counts(self, specs)

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return, per queue, how many messages wait for their ``run_at``."""
        return queues.delayed_counts(self, specs)

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Return ready, in-flight (unacked), delayed and dead-lettered counts per queue,
        and when the oldest ready message was published."""
        return queues.queue_stats(self, specs)

    def browse(self, queue: str, limit: int | None = None) -> list[StoredMessage]:
        """Read up to ``limit`` messages of ``queue``, oldest first, leaving them there."""
        return queues.browse(self, queue, limit)

    def take(self, queue: str) -> contextlib.AbstractContextManager[Iterator[Taken]]:
        """Read ``queue``'s messages oldest first; removing one deletes its row."""
        return queues.take(self, queue)

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove the ready and delayed messages of the queues; return how many."""
        return queues.purge(self, specs)

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues: every row of theirs, in flight too (its settlement then does nothing)."""
        queues.delete(self, specs)
