"""The consuming side of ``sqlite://``: claims under a lease, settlements batched
into the next claim, lease renewal while tasks run, and the return of expired
leases.

SQLite has no notifications. A consumer with nothing to do sleeps in
``select()`` on the worker's wake-up pipe and on a pipe of its own, which every
publish of this process on the same file writes to (:class:`LocalWakeups`): a
task published in the worker's process starts at once. Publishes of other
processes are found by polling, with a sleep that doubles while the queues
stay empty (``poll_interval`` up to ``max_poll_interval``) and never outlasts
the next delayed message's due time. A poll first reads (no lock); only when
a message is ready does it take the write lock to claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from ..._json import json_depth_exceeds
from .._guard import strip_compression
from ..base import Consumer, Delivery, QueueSpec
from .database import SQLITE_ERRORS, immediate, translate_sqlite

if TYPE_CHECKING:
    from . import SqliteTransport

__all__ = ["LocalWakeups", "SqliteConsumer", "SqliteDelivery"]

logger = structlog.get_logger("mqtasks.transport.sqlite")

#: Largest headers of a message read, in bytes (parsing more could take the worker's memory).
MAX_HEADERS = 1024 * 1024

#: The columns a claim returns, in the order :class:`SqliteDelivery` reads them.
COLUMNS = (
    "id, queue, message_id, headers, content_type, content_encoding, priority, body, "
    "returns, redelivered, level, run_at"
)


class LocalWakeups:
    """The wake-up pipes of this process's consumers, by database file.

    A publish writes a byte to each pipe of its file, so a consumer of the same
    process sleeping in ``select()`` claims the new message at once.
    """

    _lock = threading.Lock()
    _pipes: ClassVar[dict[Path, set[int]]] = {}

    @classmethod
    def register(cls, path: Path) -> tuple[int, int]:
        """Return a new non-blocking pipe ``(read, write)`` woken by publishes to ``path``."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        with cls._lock:
            cls._pipes.setdefault(path, set()).add(write)
        return read, write

    @classmethod
    def unregister(cls, path: Path, pipe: tuple[int, int]) -> None:
        """Stop waking ``pipe`` and close it."""
        with cls._lock:
            cls._pipes.get(path, set()).discard(pipe[1])
            for fd in pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @classmethod
    def notify(cls, path: Path) -> None:
        """Wake every consumer of this process waiting on ``path``."""
        with cls._lock:
            for fd in cls._pipes.get(path, ()):
                with contextlib.suppress(OSError):  # full: that consumer is due to wake anyway
                    os.write(fd, b"\0")


class SqliteDelivery(Delivery):
    """A delivery that remembers the row it was claimed from."""

    __slots__ = ("row_id",)

    def __init__(self, row: Sequence[Any], generation: int) -> None:
        (
            row_id,
            queue,
            message_id,
            raw_headers,
            ctype,
            cenc,
            priority,
            body,
            returns,
            redelivered,
        ) = row[:10]
        super().__init__(
            bytes(body),
            queue,
            generation,
            message_id=message_id,
            content_type=ctype,
            content_encoding=cenc,
            priority=priority,
            redelivered=bool(redelivered),
            delivery_count=int(returns) + 1,
        )
        self.row_id: int = row_id
        headers = decode_headers(raw_headers)
        if headers is None:
            self.refused = "invalid_headers"
        else:
            self.refused = strip_compression(headers)
            self.headers = headers


def decode_headers(raw: str | bytes | None) -> dict[str, Any] | None:
    """Return the headers stored as JSON, or None if they cannot be read safely."""
    if raw is None:
        return {}
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_HEADERS or json_depth_exceeds(data, 64):
        return None
    try:
        headers = json.loads(data)
    except ValueError:
        return None
    return headers if isinstance(headers, dict) else None


class SqliteConsumer(Consumer):
    """A consumer whose claims are rows leased to its consumer id.

    A claim sets ``locked_until`` (now plus the lease) and ``locked_by`` on up
    to the free prefetch window of ready rows, in one ``BEGIN IMMEDIATE``
    transaction, so no other process claims them too. The I/O loop renews the
    lease of every row it holds each third of the lease; a consumer that
    dies stops renewing, and any consumer returns rows whose lease ended to
    their queue (counting a delivery). Acks, rejects and requeues are
    collected and written in the transaction of the next claim.
    """

    wakeable: ClassVar[bool] = True
    transport: SqliteTransport

    def __init__(
        self, transport: SqliteTransport, specs: Sequence[QueueSpec], *, prefetch: int
    ) -> None:
        super().__init__(transport, specs, prefetch=prefetch)
        self.consumer_id = ""
        self._conn: sqlite3.Connection | None = None
        self._pipe: tuple[int, int] | None = None
        self._held: dict[int, SqliteDelivery] = {}
        self._pending: list[tuple[str, int]] = []  # ("a"ck | "q" requeue, row id)
        self._idle = transport.poll_interval
        self._next_due: float | None = None  # the earliest delayed message (epoch seconds)
        self._next_renew = 0.0
        self._next_sweep = 0.0
        self._turn = 0

    # -- connection --------------------------------------------------------

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Open the database and start consuming.

        Raises:
            ConfigurationError: The file cannot be written.
            ConnectionFailed: SQLite cannot open it.
        """
        self._on_delivery = on_delivery
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.transport.declare(self.specs)
        self._conn = self.transport.connect()
        try:
            with (
                translate_sqlite(self.transport.path, "register consumer"),
                immediate(self._conn) as conn,
            ):
                self._register(conn, [s.name for s in self.specs])
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        self._pipe = LocalWakeups.register(self.transport.path)
        self.generation += 1
        self._cancelled = False

    def _register(self, conn: sqlite3.Connection, queues: Sequence[str]) -> None:
        """Note this consumer as consuming ``queues`` (for ``mqtasks status``), alive for a lease."""
        until = time.time() + self.transport.lease
        conn.executemany(
            "INSERT OR REPLACE INTO mqtasks_consumers (consumer_id, queue, alive_until) "
            "VALUES (?, ?, ?)",
            [(self.consumer_id, q, until) for q in queues],
        )

    def _lost(self, exc: BaseException) -> None:
        """Log a failed statement; the next call tries again (the file stays where it is)."""
        logger.warning("sqlite.consumer_error", error=f"{type(exc).__name__}: {exc}")
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(*SQLITE_ERRORS):
                conn.execute("ROLLBACK")
        self._interrupted.wait(min(1.0, self._idle * 4))

    # -- consuming ---------------------------------------------------------

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them."""
        self.wait(timeout, -1)

    def heartbeat_check(self) -> None:
        """Renew the leases held and return expired ones of others, when due."""
        if self._conn is None:
            return
        try:
            self._housekeeping()
        except SQLITE_ERRORS as exc:
            self._lost(exc)

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Settle, claim what is ready, else sleep until a publish, a wake-up or ``timeout``."""
        if self._conn is None or self._pipe is None:
            self._sleep(timeout, wake_fd)
            return
        try:
            self._housekeeping()
            if self._fetch():
                self._idle = self.transport.poll_interval
                return
        except SQLITE_ERRORS as exc:
            self._lost(exc)
            return
        now = time.time()
        pause = min(timeout, self._idle, self._next_renew - time.monotonic())
        if self._next_due is not None:
            pause = min(pause, self._next_due - now)
        if self._sleep(max(0.0, pause), wake_fd):
            self._idle = self.transport.poll_interval  # a publish of this process: claim now
        else:
            self._idle = min(self._idle * 2, self.transport.max_poll_interval)

    def _sleep(self, timeout: float, wake_fd: int) -> bool:
        """Sleep in ``select()``; return whether a publish of this process woke us."""
        fds = [fd for fd in (wake_fd, self._pipe[0] if self._pipe else -1) if fd >= 0]
        if not fds:
            self._interrupted.wait(timeout)
            return False
        readable = select.select(fds, [], [], timeout)[0] if timeout > 0 else []
        if self._pipe is not None and self._pipe[0] in readable:
            with contextlib.suppress(OSError):
                while len(os.read(self._pipe[0], 4096)) == 4096:
                    pass
            return True
        return False

    def _housekeeping(self) -> None:
        assert self._conn is not None
        now = time.monotonic()
        lease = self.transport.lease
        if now >= self._next_renew:
            until = time.time() + lease
            with immediate(self._conn) as conn:
                if self._held:
                    conn.execute(
                        "UPDATE mqtasks_messages SET locked_until = ? WHERE locked_by = ?",
                        (until, self.consumer_id),
                    )
                conn.execute(
                    "UPDATE mqtasks_consumers SET alive_until = ? WHERE consumer_id = ?",
                    (until, self.consumer_id),
                )
            self._next_renew = now + lease / 3
        if now >= self._next_sweep:
            returned = self.transport.return_expired(self._conn)
            if returned:
                logger.warning("sqlite.leases_expired", messages=returned)
            self._next_sweep = now + lease / 4

    def _fetch(self) -> bool:
        """Write the settlements collected and claim up to the free window; True if any came."""
        assert self._conn is not None
        free = 0 if self._cancelled else self.prefetch - len(self._held)
        names = [s.name for s in self.specs]
        if free > 0 and names:
            self._turn = (self._turn + 1) % len(names)
            names = names[self._turn :] + names[: self._turn]  # no queue starves the others
        now = time.time()
        self._next_due = None
        ready = [n for n in names if self._ready(n, now)] if free > 0 else []
        if not ready and not self._pending:
            return False
        rows: list[Any] = []
        pending, self._pending = self._pending, []
        try:
            with immediate(self._conn) as conn:
                self._settle(conn, pending)
                for name in ready:
                    if free - len(rows) <= 0:
                        break
                    rows += self._claim(conn, name, free - len(rows), now)
        except BaseException:
            self._pending = pending + self._pending  # nothing was written: again next time
            raise
        for row in rows:
            delivery = SqliteDelivery(row, self.generation)
            self._held[delivery.row_id] = delivery
            assert self._on_delivery is not None
            self._on_delivery(delivery)
        return bool(rows)

    def _ready(self, queue: str, now: float) -> bool:
        """Whether ``queue`` has a message ready (a read: no lock); notes the next due time."""
        assert self._conn is not None
        due = self._conn.execute(
            "SELECT MIN(run_at) FROM mqtasks_messages INDEXED BY mqtasks_messages_due "
            "WHERE queue = ? AND locked_until IS NULL",
            (queue,),
        ).fetchone()[0]
        if due is None:
            return False
        if due <= now:
            return True
        if self._next_due is None or due < self._next_due:
            self._next_due = float(due)
        return False

    def _claim(self, conn: sqlite3.Connection, queue: str, n: int, now: float) -> list[Any]:
        """Lease up to ``n`` ready rows of ``queue``, highest level first, then oldest."""
        rows = conn.execute(
            f"UPDATE mqtasks_messages SET locked_until = ?, locked_by = ? WHERE id IN ("
            "SELECT id FROM mqtasks_messages INDEXED BY mqtasks_messages_ready "
            "WHERE queue = ? AND locked_until IS NULL AND run_at <= ? "
            f"ORDER BY level DESC, run_at, id LIMIT ?) RETURNING {COLUMNS}",
            (now + self.transport.lease, self.consumer_id, queue, now, n),
        ).fetchall()
        # RETURNING gives rows in no particular order: hand them out in queue order.
        rows.sort(key=lambda r: (-r[10], r[11], r[0]))
        return rows

    def _settle(self, conn: sqlite3.Connection, pending: Sequence[tuple[str, int]]) -> None:
        """Apply settlements; a row no longer leased to us (it expired) is left alone."""
        acked = [(row_id, self.consumer_id) for action, row_id in pending if action == "a"]
        requeued = [(row_id, self.consumer_id) for action, row_id in pending if action == "q"]
        if acked:
            conn.executemany("DELETE FROM mqtasks_messages WHERE id = ? AND locked_by = ?", acked)
        if requeued:
            conn.executemany(
                "UPDATE mqtasks_messages SET locked_until = NULL, locked_by = NULL, "
                "redelivered = 1 WHERE id = ? AND locked_by = ?",
                requeued,
            )

    # -- settling ----------------------------------------------------------

    def _settle_later(self, delivery: Delivery, action: str) -> bool:
        if not isinstance(delivery, SqliteDelivery) or delivery.generation != self.generation:
            return False
        if self._held.pop(delivery.row_id, None) is None:
            return False  # settled already
        self._pending.append((action, delivery.row_id))
        return True

    def ack(self, delivery: Delivery) -> bool:
        """Delete the row (written with the next claim). Returns False if it was stale."""
        return self._settle_later(delivery, "a")

    def reject(self, delivery: Delivery) -> bool:
        """Delete the row without running it (the worker dead-lettered it first)."""
        return self._settle_later(delivery, "a")

    def requeue(self, delivery: Delivery) -> bool:
        """Release the row: it is ready again in its old place, marked redelivered."""
        return self._settle_later(delivery, "q")

    # -- changing queues ---------------------------------------------------

    def add_queue(self, spec: QueueSpec) -> None:
        """Start claiming from ``spec`` too (consumed already: nothing)."""
        if any(s.name == spec.name for s in self.specs):
            return
        self.transport.declare([spec])
        self.specs.append(spec)
        self._idle = self.transport.poll_interval
        self._registration(lambda conn: self._register(conn, [spec.name]))

    def remove_queue(self, name: str) -> None:
        """Stop claiming from ``name``; held deliveries of it stay settleable."""
        self.specs = [s for s in self.specs if s.name != name]
        self._registration(
            lambda conn: conn.execute(
                "DELETE FROM mqtasks_consumers WHERE consumer_id = ? AND queue = ?",
                (self.consumer_id, name),
            )
        )

    def _registration(self, change: Callable[[sqlite3.Connection], object]) -> None:
        """Change this consumer's rows of ``mqtasks_consumers`` (only figures: a failure is logged)."""
        if self._conn is None:
            return  # not started: start() registers the current queues
        try:
            with immediate(self._conn) as conn:
                change(conn)
        except SQLITE_ERRORS as exc:
            self._lost(exc)

    def close(self) -> None:
        """Write the settlements collected; rows still held go back to their queues.

        A row still held at close was running when the worker gave up on it:
        its return counts as a delivery, as a lease that expired does.
        """
        self._cancelled = True
        conn, self._conn = self._conn, None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            LocalWakeups.unregister(self.transport.path, pipe)
        if conn is None:
            return
        pending, self._pending = self._pending, []
        try:
            with translate_sqlite(self.transport.path, "close consumer"), immediate(conn):
                self._settle(conn, pending)
                conn.execute(
                    "UPDATE mqtasks_messages SET locked_until = NULL, locked_by = NULL, "
                    "returns = returns + 1, redelivered = 1 WHERE locked_by = ?",
                    (self.consumer_id,),
                )
                conn.execute(
                    "DELETE FROM mqtasks_consumers WHERE consumer_id = ?", (self.consumer_id,)
                )
        except Exception as exc:  # what is left comes back once its lease ends
            logger.warning("broker.close_failed", error=str(exc))
        finally:
            self._held.clear()
            conn.close()
            self.transport.wake_local()


def stored_headers(raw: str | bytes | None) -> Mapping[str, Any]:
    """Headers of a stored row for tooling: unreadable ones read as empty."""
    return decode_headers(raw) or {}
