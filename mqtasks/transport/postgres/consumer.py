"""The consumer of the ``postgresql://`` broker: leases rows, LISTENs for publishes, renews leases.

One autocommit connection per consumer does everything: it LISTENs on the
table's channel, leases rows with the fetch statement, settles and renews. The
worker's I/O thread sleeps in ``select()`` on that connection's socket and the
worker's wake-up pipe; a NOTIFY naming one of the consumer's queues wakes it
to fetch. Without one it fetches again when the earliest held-back message of
its queues falls due, or after ``poll_interval`` (which also finds messages
whose lease ran out: a killed worker's).

Settlements are collected and sent before the next fetch. The deliveries held
belong to the consumer's id, not to its connection: after a reconnect they stay
settleable while their lease lasts (the consumer renews it every third of
the lease), so a connection blip causes no duplicate.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
import structlog
from psycopg import sql

from ..._url import mask_url
from .._guard import strip_compression
from ..base import Consumer, Delivery, QueueSpec
from .deadline import DeadlineExceeded, deadline

if TYPE_CHECKING:
    from . import PostgresTransport

__all__ = ["PostgresConsumer", "PostgresDelivery"]

logger = structlog.get_logger("mqtasks.transport.postgres")

#: Errors that mean the consumer's connection is gone.
#: What ends a consumer's connection: a deadline past (see :mod:`.deadline`) is one too.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    OSError,
    DeadlineExceeded,
)


class PostgresDelivery(Delivery):
    """A leased row: its id and the delivery count it was leased with (its lease token)."""

    __slots__ = ("count", "row_id")

    def __init__(self, row: Sequence[Any], generation: int) -> None:
        deliveries = int(row[3])
        headers = row[6]
        # A row written by another producer may hold headers that are no object.
        refused = None if isinstance(headers, dict) else "decode_error"
        headers = headers if isinstance(headers, dict) else {}
        super().__init__(
            bytes(row[9]),
            str(row[1]),
            generation,
            headers=headers,
            message_id=row[5],
            content_type=row[7],
            content_encoding=row[8],
            priority=int(row[2]) or None,
            redelivered=bool(row[4]) or deliveries > 1,
            delivery_count=deliveries,
            # A compressed body is refused unread, as on every transport (``_guard``).
            refused=refused or strip_compression(headers),
        )
        self.row_id = int(row[0])
        self.count = deliveries


class PostgresConsumer(Consumer):
    """Leases rows of its queues, up to ``prefetch`` at a time; woken by NOTIFY."""

    wakeable: ClassVar[bool] = True

    def __init__(
        self, transport: PostgresTransport, specs: Sequence[QueueSpec], *, prefetch: int
    ) -> None:
        super().__init__(transport, specs, prefetch=prefetch)
        self.pt = transport
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._conn: psycopg.Connection[Any] | None = None
        self._held: dict[int, PostgresDelivery] = {}
        self._acks: list[PostgresDelivery] = []
        self._requeues: list[PostgresDelivery] = []
        self._fetch_at = 0.0  # fetch when the clock passes this (0: at once)
        self._renew_at = 0.0
        #: Seconds PostgreSQL has to answer a turn's queries before the connection
        #: counts as lost: its heartbeat (a server that stops answering closes nothing).
        self._answer_within = max(1.0, transport.heartbeat or 10.0)

    # -- connection ----------------------------------------------------------------

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Connect and LISTEN.

        Raises:
            ConnectionFailed: PostgreSQL cannot be reached.
        """
        self._on_delivery = on_delivery
        with self.pt.errors("connect consumer"):
            self._open()
        self.generation += 1

    def _open(self) -> None:
        conn = self.pt.connect(autocommit=True)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.pt.table)))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._fetch_at = 0.0  # what was published while we were away is not notified
        self._cancelled = False

    def _lost(self, exc: BaseException) -> None:
        logger.warning(
            "broker.connection_lost", url=mask_url(self.pt.url), error=type(exc).__name__
        )
        self._drop()
        delay = 0.2
        while not (self._cancelled or self._interrupted.is_set()):
            try:
                self._open()
            except CONNECTION_ERRORS as err:
                logger.warning("broker.reconnect_failed", error=type(err).__name__, retry_in=delay)
                self._interrupted.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            logger.info("broker.reconnected", url=mask_url(self.pt.url))
            return

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- consuming -----------------------------------------------------------------

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and dispatch them."""
        self.wait(timeout, -1)

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Settle, fetch what is due, else sleep until a NOTIFY, a wake-up, a due time or ``timeout``."""
        conn = self._conn
        if conn is None:
            if self._cancelled:
                if wake_fd >= 0:
                    select.select([wake_fd], [], [], timeout)
                else:
                    time.sleep(timeout)
                return
            self._lost(ConnectionError("not connected"))
            return
        try:
            with deadline(conn, timeout + self._answer_within):
                self._turn(conn, timeout, wake_fd)
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def _turn(self, conn: psycopg.Connection[Any], timeout: float, wake_fd: int) -> None:
        """One turn of :meth:`wait`: settle, renew, fetch, else sleep."""
        self._settle()
        self._renew()
        if self._notified(conn):
            self._fetch_at = 0.0
        if self._fetch():
            return
        if self._notified(conn):
            # Read during the queries above into psycopg's buffer, where the
            # select() below on the socket would not see it.
            self._fetch_at = 0.0
            self._fetch()
            return
        now = time.monotonic()
        wait_for = max(0.0, min(timeout, self._fetch_at - now, self._renew_at - now))
        fds = [conn.fileno()] + ([wake_fd] if wake_fd >= 0 else [])
        readable = select.select(fds, [], [], wait_for)[0]
        if conn.fileno() in readable and self._notified(conn):
            self._fetch_at = 0.0
            self._settle()
            self._fetch()

    def heartbeat_check(self) -> None:
        """Renew the leases held when due."""
        if self._conn is None:
            return
        try:
            with deadline(self._conn, self._answer_within):
                self._renew()
        except CONNECTION_ERRORS as exc:
            self._lost(exc)

    def _notified(self, conn: psycopg.Connection[Any]) -> bool:
        """Read the notifications received; whether one names a queue of ours."""
        names = {s.name for s in self.specs}
        return any(n.payload in names for n in conn.notifies(timeout=0))

    def _fetch(self) -> bool:
        """Lease up to the free window of due rows if a fetch is due; True if any came."""
        free = 0 if self._cancelled else self.prefetch - len(self._held)
        if free <= 0 or time.monotonic() < self._fetch_at or not self.specs:
            return False
        assert self._conn is not None
        params = {
            "queues": [s.name for s in self.specs],
            "n": free,
            "lease": self.pt.lease,
            "owner": self.owner,
        }
        rows = self._conn.execute(self.pt.sql["fetch"], params, binary=True).fetchall()
        rows.sort(key=lambda r: (-int(r[2]), r[10], int(r[0])))
        if len(rows) < free:
            # Drained: sleep until a NOTIFY, the earliest held-back row or the poll.
            row = self._conn.execute(self.pt.sql["next_due"], params).fetchone()
            after = self.pt.poll_interval
            if row is not None and row[0] is not None:
                after = min(after, max(0.0, float(row[0])))
            self._fetch_at = time.monotonic() + after
        for row in rows:
            delivery = PostgresDelivery(row, self.generation)
            self._held[delivery.row_id] = delivery
            assert self._on_delivery is not None
            self._on_delivery(delivery)
        return bool(rows)

    def _renew(self) -> None:
        """Extend the lease of every held row, and the consumer's own rows, every third of the lease."""
        if time.monotonic() < self._renew_at:
            return
        self._renew_at = time.monotonic() + self.pt.lease / 3
        assert self._conn is not None
        queues = {
            "owner": self.owner,
            "queues": [s.name for s in self.specs],
            "lease": self.pt.lease,
        }
        self._conn.execute(self.pt.sql["beat"], queues)
        self._conn.execute(self.pt.sql["unbeat"], queues)
        if not self._held:
            return
        ids = list(self._held)
        params = {"ids": ids, "owner": self.owner, "lease": self.pt.lease}
        kept = {int(r[0]) for r in self._conn.execute(self.pt.sql["renew"], params).fetchall()}
        lost = [i for i in ids if i not in kept]
        if lost:
            # Our lease ran out (a long outage) and another consumer may have them:
            # settling them now does nothing.
            logger.warning("postgres.leases_lost", messages=len(lost))

    def _settle(self) -> None:
        """Send the acks and requeues collected since the last call."""
        if not (self._acks or self._requeues):
            return
        assert self._conn is not None
        for statement, batch in (("ack", self._acks), ("requeue", self._requeues)):
            if batch:
                params = {
                    "ids": [d.row_id for d in batch],
                    "counts": [d.count for d in batch],
                    "owner": self.owner,
                }
                self._conn.execute(self.pt.sql[statement], params)
                batch.clear()
        if not self._cancelled:
            self._fetch_at = 0.0  # the window has room again

    # -- settling ----------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> PostgresDelivery | None:
        if not isinstance(delivery, PostgresDelivery) or delivery.generation != self.generation:
            return None
        found = self._held.get(delivery.row_id)
        if found is not delivery:
            return None
        del self._held[delivery.row_id]
        return found

    def ack(self, delivery: Delivery) -> bool:
        """Delete the row (sent before the next fetch). False if it was settled already."""
        found = self._take(delivery)
        if found is None:
            return False
        self._acks.append(found)
        return True

    def reject(self, delivery: Delivery) -> bool:
        """Delete the row: the worker has dead-lettered it already."""
        return self.ack(delivery)

    def requeue(self, delivery: Delivery) -> bool:
        """Clear the row's lease; it keeps its place (its ``run_at``) and its delivery count."""
        found = self._take(delivery)
        if found is None:
            return False
        self._requeues.append(found)
        return True

    # -- changing queues ---------------------------------------------------------------

    def add_queue(self, spec: QueueSpec) -> None:
        """Take from ``spec`` too, from the next fetch on (consumed already: nothing)."""
        if any(s.name == spec.name for s in self.specs):
            return
        self.pt.declare([spec])
        self.specs.append(spec)
        self._fetch_at = self._renew_at = 0.0

    def remove_queue(self, name: str) -> None:
        """Stop taking from ``name``; held deliveries of it stay settleable."""
        self.specs = [s for s in self.specs if s.name != name]
        self._renew_at = 0.0  # no longer counted as its consumer

    def close(self) -> None:
        """Settle what is pending and hand back every held row (it counts as delivered)."""
        self._cancelled = True
        if self._conn is None and (self._acks or self._requeues or self._held):
            with contextlib.suppress(*CONNECTION_ERRORS):
                self._open()
            self._cancelled = True
        conn = self._conn
        if conn is None:
            return
        try:
            with deadline(conn, self._answer_within):
                self._settle()
                if self._held:
                    params = {"ids": list(self._held), "owner": self.owner}
                    conn.execute(self.pt.sql["release"], params)
                conn.execute(self.pt.sql["unbeat"], {"owner": self.owner, "queues": []})
        except CONNECTION_ERRORS as exc:
            # Left leased: they come back once the lease runs out.
            logger.warning("broker.close_failed", error=type(exc).__name__)
        finally:
            self._held.clear()
            self._drop()
