"""``postgresql://`` (and ``postgres://``) as a broker: messages in a table, psycopg 3.

One table, ``<table_prefix>messages`` (``mqtasks_messages`` by default), holds
the messages of every queue, and ``<table_prefix>consumers`` the consumers of
each (for ``mqtasks status``); they are created on first use under a
transaction-level advisory lock, so workers starting together do not trip over
each other's ``CREATE TABLE`` (:mod:`.schema` has their columns and statements).

* **Publishing** is an ``INSERT`` and a ``NOTIFY <table>, '<queue>'`` in one
  transaction; the publish returns once it committed. A delay (countdown,
  retry backoff) is the row's ``run_at``, on the server's clock.
* **Consuming** (:mod:`.consumer`) leases rows in one statement:
  ``SELECT ... FOR UPDATE SKIP LOCKED`` picks the due rows held by nobody,
  highest priority first, then oldest ``run_at``, and the same ``UPDATE`` sets
  ``locked_until`` and counts the delivery. The consumer LISTENs on its own
  connection and sleeps in ``select()`` until a NOTIFY names one of its queues,
  a held message falls due, or ``poll_interval`` passes; it renews the lease of
  what it holds, so a SIGKILLed worker's messages come back once their lease
  runs out, and a live worker's are never handed to another.
* **Settling**: an ack (or reject) deletes the row, a requeue clears its lease.
  A dead letter is a row of queue ``<queue>.dlq`` with its reason in the
  headers, as on every broker: ``mqtasks dlq`` browses it with a plain
  ``SELECT``.
* **The outbox**: :meth:`PostgresTransport.publish_in_transaction` inserts in
  the caller's own connection and transaction (``apply_async(connection=conn)``):
  the message exists, and its NOTIFY is sent, only if that transaction commits.

Not supported (ConfigurationError): topic exchanges (events), ``max_length``,
``message_ttl``, single-active-consumer and expiring queues.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import structlog

from ..._url import mask_url, redact, remember_secret
from ...exceptions import (
    ConfigurationError,
    ConnectionFailed,
    PublishError,
    TransportError,
)
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
from .browse import stored, take_messages
from .deadline import DeadlineExceeded, deadline
from .schema import CONSUMERS, INDEXES, SQL, TABLE

try:
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        'The postgresql:// broker needs psycopg: pip install "mqtasks[postgres]".'
    ) from exc

__all__ = ["DEFAULT_TABLE_PREFIX", "PostgresTransport"]

logger = structlog.get_logger("mqtasks.transport.postgres")

#: The table is ``<prefix>messages`` unless told otherwise.
DEFAULT_TABLE_PREFIX = "mqtasks_"
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_OPTIONS = ("table_prefix", "lease", "poll_interval")
#: Highest priority kept apart (PostgreSQL's ``smallint`` would take more; RabbitMQ stops here).
MAX_PRIORITY = 255


class PostgresTransport(Transport):
    """Messages in a PostgreSQL table: SKIP LOCKED leases, LISTEN/NOTIFY wake-ups.

    Transport options (``transport_options``, or the URL's query for
    ``table_prefix``): ``table_prefix`` (``mqtasks_``: the table is
    ``mqtasks_messages``), ``lease`` (30 s: how long a message held by a
    worker that stopped renewing it stays invisible; the consumer renews it
    every third of that), ``poll_interval`` (5 s: the longest a consumer
    sleeps without a NOTIFY; it bounds how late a message whose lease ran out
    is seen).

    Priorities 0 to 255 order every queue, higher first (and are capped at a
    queue's ``max_priority``). A publish returns once its transaction committed.
    """

    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")
    capabilities = Capabilities(
        delays=True,
        priorities=True,
        max_priority=True,
        delivery_count=True,
        confirms=True,
        dead_letter_browse=True,
    )

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for name, value in query:
            if name == "password" and value:
                remember_secret(f"postgresql://user:{quote(value, safe='')}@host")
        opts = dict(self.transport_options)
        unknown = sorted(set(opts) - set(_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"Unknown transport option(s) {unknown} for postgresql://; known: {list(_OPTIONS)}."
            )
        url_prefix = [v for k, v in query if k == "table_prefix"]
        prefix = str(
            opts.get("table_prefix", url_prefix[-1] if url_prefix else DEFAULT_TABLE_PREFIX)
        )
        if not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"table_prefix {prefix!r} of the broker at {mask_url(url)}: use up to 40 "
                "lower-case letters, digits and '_', not starting with a digit."
            )
        self.lease = float(opts.get("lease", 30.0))
        self.poll_interval = float(opts.get("poll_interval", 5.0))
        if not (1.0 <= self.lease <= 86400 and 0.05 <= self.poll_interval <= 600):
            raise ConfigurationError(
                "postgresql:// transport options: lease must be 1 to 86400 seconds and "
                "poll_interval 0.05 to 600 seconds."
            )
        #: The message table (shared by every queue) and the NOTIFY channel of its publishes.
        self.table = f"{prefix}messages"
        self.table_prefix = prefix
        rest = [(k, v) for k, v in query if k != "table_prefix"]
        scheme = "postgresql"
        # quote, not quote_plus: libpq reads a "+" in a URI as a plus sign.
        query_text = urlencode(rest, quote_via=quote)
        self.conninfo = urlunsplit(parts._replace(scheme=scheme, query=query_text))
        given = {k for k, _ in rest}
        defaults: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
            "application_name": "mqtasks-broker",
            # A server that stops answering breaks the connection in about 25 s
            # instead of hanging a consumer or a publish on it.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._connect_kwargs = {k: v for k, v in defaults.items() if k not in given}
        if not self.tls.is_default:
            # The TLS settings (MQTASKS_TLS_*) as libpq parameters, as the result backend does.
            from ...backend.postgres import _libpq_tls

            self.tls.check()
            self._connect_kwargs.update(_libpq_tls(self.tls))
        self._dbname = psycopg.conninfo.conninfo_to_dict(self.conninfo).get("dbname")
        ident = sql.Identifier(self.table)
        channel = sql.Literal(self.table)
        #: The table of the consumers of each queue (``mqtasks status``).
        self.consumers_table = f"{prefix}consumers"
        consumers = sql.Identifier(self.consumers_table)
        self.sql = {
            k: sql.SQL(v).format(t=ident, c=consumers, channel=channel) for k, v in SQL.items()
        }
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pool_lock = threading.Lock()
        self._max_priority: dict[str, int] = {}

    # -- connections and the table ---------------------------------------------------

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn psycopg (and socket) errors into
        :class:`~mqtasks.exceptions.TransportError`, the URL masked."""
        try:
            yield
        except (TransportError, ConfigurationError):
            raise
        except DeadlineExceeded as exc:
            raise ConnectionFailed(
                redact(f"{what}: the broker at {mask_url(self.url)} did not answer ({exc})")
            ) from exc
        except (psycopg.OperationalError, OSError) as exc:
            raise ConnectionFailed(
                redact(
                    f"{what}: cannot reach the broker at {mask_url(self.url)} "
                    f"({type(exc).__name__}: {str(exc).strip()})"
                )
            ) from exc
        except psycopg.Error as exc:
            raise TransportError(
                redact(
                    f"{what}: the broker at {mask_url(self.url)} refused "
                    f"({type(exc).__name__}: {str(exc).strip()})"
                )
            ) from exc

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a connection of its own (a consumer's, tooling's)."""
        return psycopg.connect(self.conninfo, **self._connect_kwargs, **kwargs)

    def create_table(self, conn: psycopg.Connection[Any]) -> None:
        """Create the table and its index if missing, in ``conn``'s transaction, under the lock."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"mqtasks:{self.table}"])
        ident = sql.Identifier(self.table)
        conn.execute(sql.SQL(TABLE).format(t=ident))
        conn.execute(sql.SQL(CONSUMERS).format(c=sql.Identifier(self.consumers_table)))
        for suffix, columns in INDEXES.items():
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} " + columns).format(
                    sql.Identifier(f"{self.table}_{suffix}"), ident
                )
            )

    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """The publishing connection pool, opened on first use once the table exists."""
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._pool is None:
                # A direct connection first: an unreachable server fails now, with
                # libpq's reason, instead of after the pool's wait for a connection.
                with self.errors("create the message table"), self.connect() as conn:
                    self.create_table(conn)
                self._pool = ConnectionPool(
                    self.conninfo,
                    kwargs=self._connect_kwargs,
                    min_size=1,
                    max_size=max(1, self.pool_size),
                    timeout=self.publish_timeout,
                    name=f"mqtasks-broker-{self.table}",
                    # A connection the server ended (a restart, a failover) is
                    # replaced when taken, rather than failing the next publish.
                    check=self._check_connection,
                    open=True,
                )
            return self._pool

    def _check_connection(self, conn: psycopg.Connection[Any]) -> None:
        """The pool's check of a connection it hands out, bounded like a publish."""
        with deadline(conn, self.publish_timeout):
            ConnectionPool.check_connection(conn)

    @contextlib.contextmanager
    def transaction(
        self, what: str, timeout: float | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed at the end (rolled back on
        error), its calls and the commit bounded by ``timeout`` (``publish_timeout``)."""
        seconds = self.publish_timeout if timeout is None else timeout
        with (
            self.errors(what),
            self.pool().connection() as conn,
            deadline(conn, seconds),
            conn.transaction(),
        ):
            yield conn

    def close(self) -> None:
        """Close the publishing pool (a later publish opens another)."""
        super().close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @property
    def recovery_time(self) -> float:
        """A killed worker's messages come back once their lease ran out and a consumer polls."""
        return self.lease + self.poll_interval

    def check_broker(self) -> list[str]:
        """Warn when PostgreSQL acknowledges a commit before it is on disk."""
        with self.transaction("read the server settings") as conn:
            row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
        if row is not None and str(row[0]) == "off":
            return [
                "PostgreSQL runs with synchronous_commit=off: a publish (and an ack) returns "
                "before its commit is on disk, so a server crash can lose the last published "
                "tasks or run acknowledged ones again. Set synchronous_commit=on for the "
                "broker's database or role."
            ]
        return []

    # -- topology ----------------------------------------------------------------------

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Check the queue options, remember each ``max_priority``; create the table on first use.

        Queues need no declaration: a queue is the rows that name it.

        Raises:
            ConfigurationError: An option this broker cannot honour.
            ConnectionFailed: PostgreSQL cannot be reached.
        """
        for spec in specs:
            self.queue_arguments(spec)
            if spec.max_priority is None:
                self._max_priority.pop(spec.name, None)
            else:
                self._max_priority[spec.name] = spec.max_priority
        self.pool()
        self._declared.update(s.name for s in specs)

    def priority_of(self, queue: str, priority: int | None) -> int:
        """The priority ``queue`` ranks a message of ``priority`` at (0 to its cap)."""
        if not priority or queue.endswith(DLQ_SUFFIX):
            return 0  # dead letters are read oldest first
        cap = min(self._max_priority.get(queue, MAX_PRIORITY), MAX_PRIORITY)
        return max(0, min(int(priority), cap))

    # -- publishing --------------------------------------------------------------------

    def row(self, queue: str, envelope: Envelope, delay: float | None) -> dict[str, Any]:
        """The parameters of ``envelope``'s insert into ``queue``.

        Raises:
            PublishError: ``delay`` is not a finite number.
        """
        if delay is not None and not math.isfinite(delay):
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: "
                f"the delay must be a finite number of seconds, not {delay!r}.",
                task_id=envelope.message_id,
            )
        return {
            "queue": queue,
            "priority": self.priority_of(queue, envelope.priority),
            "delay": max(0.0, float(delay or 0.0)),
            "message_id": envelope.message_id,
            "headers": Jsonb(dict(envelope.headers)),
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "body": bytes(envelope.body),
        }

    def _not_enqueued(self, envelope: Envelope, queue: str, exc: BaseException) -> PublishError:
        if isinstance(exc, TransportError) and exc.__cause__ is not None:
            exc = exc.__cause__  # the driver's own words, not our translation of them
        if isinstance(exc, DeadlineExceeded):
            # The commit may have been applied and only its answer missing.
            return PublishError(
                f"Task {envelope.message_id} was NOT confirmed: the broker at "
                f"{mask_url(self.url)} gave {exc}; it may or may not be enqueued on "
                f"{queue!r}. Publishing it again with the same task id makes a duplicate "
                "detectable.",
                task_id=envelope.message_id,
            )
        return PublishError(
            redact(
                f"Task {envelope.message_id} was NOT enqueued on {queue!r}: the broker at "
                f"{mask_url(self.url)} failed ({type(exc).__name__}: {str(exc).strip()})"
            ),
            task_id=envelope.message_id,
        )

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Insert ``envelope`` (held until ``now() + delay`` if given) and NOTIFY its queue.

        Returns once the transaction committed.

        Raises:
            PublishError: PostgreSQL did not take it (nothing was inserted).
        """
        params = self.row(queue, envelope, delay)
        try:
            with self.transaction(f"publish to {queue!r}", timeout) as conn:
                conn.execute(self.sql["insert"], params)
                conn.execute(self.sql["notify"], [queue])
        except (TransportError, psycopg.Error, TypeError, ValueError) as exc:
            raise self._not_enqueued(envelope, queue, exc) from exc

    def publish_many(
        self,
        items: Sequence[tuple[str, Envelope]],
        *,
        timeout: float | None = None,
        delays: Sequence[float | None] | None = None,
    ) -> list[BaseException | None]:
        """Insert many messages in one transaction (one NOTIFY per queue); all or none.

        Args:
            items: ``(queue, envelope)`` pairs.
            timeout: Seconds for the transaction's calls and commit
                (``publish_timeout`` by default).
            delays: Per item, seconds the message is held (as :meth:`publish`'s ``delay``).
        """
        if not items:
            return []
        results: list[BaseException | None] = [None] * len(items)
        rows: list[dict[str, Any]] = []
        for n, (queue, envelope) in enumerate(items):
            try:
                rows.append(self.row(queue, envelope, delays[n] if delays else None))
            except PublishError as exc:
                results[n] = exc
        try:
            with self.transaction(f"publish {len(rows)} messages", timeout) as conn:
                with conn.cursor() as cur:
                    cur.executemany(self.sql["insert"], rows)
                for queue in dict.fromkeys(r["queue"] for r in rows):
                    conn.execute(self.sql["notify"], [queue])
        except (TransportError, psycopg.Error, TypeError, ValueError) as exc:
            return [
                err if err is not None else self._not_enqueued(env, q, exc)
                for err, (q, env) in zip(results, items, strict=True)
            ]
        return results

    def publish_in_transaction(
        self,
        connection: Any,
        queue: str,
        envelope: Envelope,
        *,
        delay: float | None = None,
    ) -> None:
        """Insert ``envelope`` in the caller's connection and transaction (the outbox).

        The row and its NOTIFY exist only once the caller's transaction commits;
        a rollback publishes nothing. A savepoint wraps the insert, so a failed
        insert leaves the caller's transaction usable.

        Args:
            connection: A psycopg 3 ``Connection`` to the broker's database.

        Raises:
            ConfigurationError: ``connection`` is not a psycopg 3 connection, or
                is to another database.
            PublishError: The insert failed (the caller's transaction goes on).
        """
        if not isinstance(connection, psycopg.Connection):
            raise ConfigurationError(
                f"connection= must be a psycopg 3 Connection (psycopg.connect(...)), not "
                f"{type(connection).__name__}; with SQLAlchemy pass "
                "session.connection().connection.driver_connection, with Django "
                "django.db.connection.connection."
            )
        dbname = connection.info.dbname
        if self._dbname and dbname != self._dbname:
            raise ConfigurationError(
                f"connection= is to database {dbname!r}, but the broker's messages are in "
                f"{self._dbname!r} ({mask_url(self.url)}): the outbox inserts in the "
                "caller's transaction, so it must be a connection to the broker's database."
            )
        params = self.row(queue, envelope, delay)
        self.pool()  # the table exists before the caller's transaction inserts into it
        try:
            with connection.transaction():
                connection.execute(self.sql["insert"], params)
                connection.execute(self.sql["notify"], [queue])
        except (psycopg.Error, TypeError, ValueError) as exc:
            raise self._not_enqueued(envelope, queue, exc) from exc

    # -- consuming ---------------------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` with a connection of its own."""
        from .consumer import PostgresConsumer

        self.declare(specs)
        return PostgresConsumer(self, specs, prefetch=prefetch)

    # -- reading queues ----------------------------------------------------------------

    def _counts(self, statement: str, specs: Sequence[QueueSpec]) -> dict[str, int]:
        names = [s.name for s in specs]
        with self.transaction("count messages") as conn:
            rows = conn.execute(self.sql[statement], {"queues": names}).fetchall()
        found = {str(q): int(n) for q, n in rows}
        return {name: found.get(name, 0) for name in names}

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return the ready messages per queue (due, held by nobody); an unknown queue is empty."""
        return self._counts("count_ready", specs)

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return, per queue, the messages held for a delay (``run_at`` in the future)."""
        return {name: stats.delayed or 0 for name, stats in self.queue_stats(specs).items()}

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Count each queue's ready, leased (unacked), delayed and dead-lettered messages."""
        names = [s.name for s in specs]
        dead = {s.name: s.dead_letter_name for s in specs if not s.name.endswith(DLQ_SUFFIX)}
        every = list(dict.fromkeys([*names, *dead.values()]))
        with self.transaction("read queue statistics") as conn:
            rows = conn.execute(self.sql["stats"], {"queues": every}).fetchall()
            counted = conn.execute(self.sql["consumers"], {"queues": names}).fetchall()
        found = {str(r[0]): r for r in rows}
        consumers = {str(q): int(n) for q, n in counted}
        stats: dict[str, QueueStats] = {}
        for name in names:
            row = found.get(name)
            ready, unacked, delayed, head = (
                (int(row[1]), int(row[2]), int(row[3]), row[4]) if row else (0, 0, 0, None)
            )
            dead_row = found.get(dead[name]) if name in dead else None
            stats[name] = QueueStats(
                name,
                ready=ready,
                unacked=unacked,
                delayed=delayed,
                dead_lettered=(sum(int(x) for x in dead_row[1:4]) if dead_row else 0)
                if name in dead
                else None,
                consumers=consumers.get(name, 0),
                head_published_at=float(head) if head is not None else None,
            )
        return stats

    def browse(self, queue: str, limit: int | None = None) -> list[StoredMessage]:
        """Read up to ``limit`` messages of ``queue``, oldest first, leaving them untouched."""
        if limit == 0:
            return []
        with self.transaction(f"read {queue!r}") as conn:
            rows = conn.execute(self.sql["browse"], {"queue": queue, "limit": limit}).fetchall()
        return [stored(row) for row in rows]

    def take(self, queue: str) -> contextlib.AbstractContextManager[Iterator[Taken]]:
        """Take ``queue``'s messages oldest first, each leased to this call until removed
        or handed back at the end (see :func:`~.browse.take_messages`)."""
        return take_messages(self, queue)

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Delete the ready and delayed messages of the queues (not the held ones); return how many."""
        with self.transaction("purge") as conn:
            return conn.execute(self.sql["purge"], {"queues": [s.name for s in specs]}).rowcount

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete every message of the queues, held ones included, and their consumers' rows
        (a live consumer writes its own again within a third of the lease)."""
        names = [s.name for s in specs]
        for name in names:
            self._declared.discard(name)
            self._max_priority.pop(name, None)
        with self.transaction("delete queues") as conn:
            conn.execute(self.sql["delete"], {"queues": names})
            conn.execute(self.sql["delete_consumers"], {"queues": names})

    def drop_table(self) -> None:
        """Drop the message and consumer tables with every message in them (tests, uninstalling)."""
        self.close()
        with self.errors("drop the message table"), self.connect() as conn:
            for table in (self.table, self.consumers_table):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
