"""``postgresql://`` (and ``postgres://``): the state backend on PostgreSQL (psycopg 3 and its pool).

Six tables and a sequence, named from ``table_prefix`` (``mqtasks_``, or the
URL's ``?table_prefix=``), created on first use and by :meth:`PostgresBackend.migrate`
under a transaction-level advisory lock, so that workers starting together do
not trip over each other's ``CREATE TABLE``:

* ``<t>results`` (task_id, record, final, expires_at): a final write is one
  upsert whose ``WHERE NOT final`` lets only the first final record in, then a
  ``NOTIFY <t>results, '<task id>'`` in the same transaction (sent at commit).
* ``<t>kv`` (key, value, num, expires_at): values, counters (``num``) and the
  row of each set, which also counts its members.
* ``<t>members`` (key, member): the members of the sets.
* ``<t>leases`` (name, owner, token, expires_at), tokens from ``<t>lease_tokens``;
  the writes fenced by a lease (``mqtasks.backend.postgres.fenced``) lock its row.
* ``<t>revocations`` (task_id, terminate, expires_at): each revocation (and
  removal) is also a ``NOTIFY <t>revocations`` in its transaction, which
  :meth:`PostgresBackend.watch_revocations` LISTENs to.
* ``<t>buckets`` and ``<t>slots``: token buckets and concurrency slots
  (``mqtasks.backend.postgres.flow``, where their methods are).

Waiting for a result (:mod:`.listener`): one LISTEN connection per backend,
shared by the waiting calls of the process. Times are the server's (``now()``),
never a client's clock. An expired row reads as absent and is written over;
every ``sweep_every`` writes a process deletes a bounded batch of expired rows.
The psycopg extra installs the driver: ``pip install "mqtasks[postgres]"``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import structlog

from ..._url import mask_url, redact, remember_secret
from ...exceptions import BackendError, ConfigurationError
from ...transport.tls import TLSOptions
from ..base import Backend, ResultWrite, Revocation, RevocationListener, Watch
from ..watch import WatchThread, encode_notice
from . import fenced, flow
from .listener import Listener, listen_notifies
from .schema import EXPIRING, SQL, TABLES

try:
    import psycopg
    from psycopg import sql
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        'The postgresql:// result backend needs psycopg: pip install "mqtasks[postgres]".'
    ) from exc

__all__ = ["DEFAULT_TABLE_PREFIX", "PostgresBackend"]

logger = structlog.get_logger("mqtasks.backend.postgres")

#: Tables are named ``<prefix>results``, ``<prefix>kv``... unless told otherwise.
DEFAULT_TABLE_PREFIX = "mqtasks_"
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def _libpq_tls(tls: TLSOptions) -> dict[str, str]:
    """The libpq connection parameters of ``tls``: verify-full unless ``verify`` is off."""
    params = {"sslmode": "verify-full" if tls.verify else "require"}
    if tls.ca_file is not None:
        params["sslrootcert"] = tls.ca_file
    if tls.cert_file is not None:
        params["sslcert"] = tls.cert_file
    if tls.key_file is not None:
        params["sslkey"] = tls.key_file
    return params


class PostgresBackend(Backend):
    """Results and coordination state in PostgreSQL tables; thread-safe (a connection pool).

    :meth:`wait_result` calls share one LISTEN connection (and its thread),
    opened with the first of them and closed some seconds after the last.

    Args:
        url: ``postgresql://user[:password]@host:port/database``; the query may
            set ``table_prefix`` and any libpq parameter (``sslmode``...).
        key_prefix: Put in front of every key and task id, so that apps can
            share the tables.
        tls: Connect with ``sslmode=verify-full`` (``require`` if ``verify`` is
            off) and these files; None leaves TLS to the URL's parameters.
        table_prefix: Names the tables (lower-case letters, digits, ``_``); the
            URL's ``?table_prefix=`` when None, else ``mqtasks_``.
        pool_size: Most connections the pool keeps open.
        connect_timeout: Seconds to wait for a connection (libpq rounds up, to
            at least 2).
        pool_timeout: Seconds an operation waits for a free pooled connection.
        sweep_every: Writes between two deletions of a batch of expired rows.
    """

    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")

    #: Most expired rows of each table one sweep deletes.
    sweep_batch: ClassVar[int] = 1000

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "mqtasks:",
        tls: TLSOptions | None = None,
        table_prefix: str | None = None,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        pool_timeout: float = 10.0,
        sweep_every: int = 1000,
    ) -> None:
        super().__init__(url, key_prefix=key_prefix, tls=tls)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for name, value in query:
            if name == "password" and value:
                remember_secret(f"postgresql://user:{quote(value, safe='')}@host")
        url_prefix = [v for k, v in query if k == "table_prefix"]
        if table_prefix is None:
            table_prefix = url_prefix[-1] if url_prefix else DEFAULT_TABLE_PREFIX
        if not _PREFIX.fullmatch(table_prefix):
            raise ConfigurationError(
                f"table_prefix {table_prefix!r} of the result backend at {mask_url(url)}: use "
                "up to 40 lower-case letters, digits and '_', not starting with a digit."
            )
        #: Names the tables: ``<table_prefix>results``, ``<table_prefix>kv``...
        self.table_prefix = table_prefix
        #: The NOTIFY channel final results are announced on.
        self.channel = f"{table_prefix}results"
        #: The NOTIFY channel revocations are announced on.
        self.revocation_channel = f"{table_prefix}revocations"
        rest = [(k, v) for k, v in query if k != "table_prefix"]
        self.conninfo = urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote)))
        given = {k for k, _ in rest}
        defaults: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "application_name": "mqtasks",
            # A server that stops answering (a black hole) breaks the connection
            # within about 25 s instead of hanging the calls on it.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._connect_kwargs: dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
        if tls is not None:
            tls.check()
            self._connect_kwargs.update(_libpq_tls(tls))
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.sweep_every = sweep_every
        self._tables = {name: f"{table_prefix}{name}" for name in TABLES}
        self._sequence = f"{table_prefix}lease_tokens"
        names: dict[str, sql.Composable] = {k: sql.Identifier(v) for k, v in self._tables.items()}
        names["seq"] = sql.Literal(self._sequence)
        self._sql = {name: sql.SQL(text).format(**names) for name, text in SQL.items()}
        self._lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._listener: Listener | None = None
        self._writes = itertools.count(1)

    # -- connections and tables ----------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn psycopg (and socket) errors into :class:`BackendError`, the URL masked."""
        try:
            yield
        except BackendError:
            raise
        except (psycopg.Error, OSError) as exc:
            raise BackendError(
                redact(
                    f"{what}: the result backend at {mask_url(self.url)} failed "
                    f"({type(exc).__name__}: {str(exc).strip()})"
                )
            ) from exc

    def _connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo, **self._connect_kwargs, **kwargs)

    def _create(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Create what is missing, in ``conn``'s transaction, under the advisory lock."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"mqtasks:{self.channel}"])
        done: list[str] = []
        for name, ddl in TABLES.items():
            table = self._tables[name]
            statement = sql.SQL(ddl).format(t=sql.Identifier(table))
            done.append(self._create_one(conn, "table", table, statement))
            if name in EXPIRING:
                index = f"{table}_expires_at"
                statement = sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (expires_at)").format(
                    i=sql.Identifier(index), t=sql.Identifier(table)
                )
                done.append(self._create_one(conn, "index", index, statement))
        statement = sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(
            sql.Identifier(self._sequence)
        )
        done.append(self._create_one(conn, "sequence", self._sequence, statement))
        return done

    @staticmethod
    def _create_one(
        conn: psycopg.Connection[Any], kind: str, name: str, statement: sql.Composed
    ) -> str:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name]).fetchone()
        if row is not None and row[0]:
            return f"{kind} {name} exists"
        conn.execute(statement)
        return f"created {kind} {name}"

    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """The connection pool, opened on first use once the tables exist."""
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                # A direct connection first: an unreachable server fails now, with
                # libpq's reason, instead of after the pool's wait for a connection.
                with self._errors("create the tables"), self._connect() as conn:
                    self._create(conn)
                pool = ConnectionPool(
                    self.conninfo,
                    kwargs=self._connect_kwargs,
                    min_size=1,
                    max_size=max(1, self.pool_size),
                    timeout=self.pool_timeout,
                    name=f"mqtasks-backend-{self.table_prefix}",
                    open=True,
                )
                self._pool = pool
            return self._pool

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed at the end (rolled back on error)."""
        with self._errors(what), self.pool().connection() as conn:
            yield conn

    def _wrote(self) -> None:
        if self.sweep_every > 0 and next(self._writes) % self.sweep_every == 0:
            # The write is committed: a failed sweep must not make it look failed.
            try:
                self.sweep()
            except BackendError as exc:
                logger.warning("backend.sweep_failed", error=str(exc))

    def sweep(self) -> None:
        """Delete a batch of expired rows of each table (rows a transaction holds are skipped)."""
        with self._transaction("delete expired rows") as conn:
            for name in (
                "sweep_results",
                "sweep_kv",
                "sweep_leases",
                "sweep_revocations",
                "sweep_buckets",
                "sweep_slots",
            ):
                conn.execute(self._sql[name], {"limit": self.sweep_batch})

    def migrate(self) -> list[str]:
        """Create the tables, indexes and sequence that are missing; return what was done.

        Raises:
            BackendError: PostgreSQL cannot be reached or refused.
        """
        with self._errors("create the tables"), self._connect() as conn:
            return self._create(conn)

    def check(self) -> None:
        """Run ``SELECT 1`` (creating the tables first, on first use).

        Raises:
            BackendError: PostgreSQL cannot be reached or refused.
        """
        with self._transaction("check") as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        """Close the pool and the listening connection; a later call opens others."""
        with self._lock:
            pool, self._pool = self._pool, None
            listener = self._listener
        if listener is not None:
            listener.close()
        if pool is not None:
            pool.close()

    def drop_tables(self) -> None:
        """Drop this backend's tables and sequence, with everything stored in them."""
        self.close()
        with self._errors("drop the tables"), self._connect() as conn:
            for table in self._tables.values():
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            conn.execute(
                sql.SQL("DROP SEQUENCE IF EXISTS {}").format(sql.Identifier(self._sequence))
            )

    # -- results ------------------------------------------------------------------------

    def _id(self, task_id: str) -> str:
        return self.key_prefix + task_id

    def store_result(self, task_id: str, record: bytes, *, final: bool, expires: float) -> bool:
        """Upsert ``record`` unless a final one is stored; NOTIFY a final write at commit."""
        key = self._id(task_id)
        params = {"id": key, "record": bytes(record), "final": final, "ttl": expires}
        with self._transaction(f"store the result of {task_id}") as conn:
            written = conn.execute(self._sql["store"], params).fetchone() is not None
            if written and final:
                conn.execute(self._sql["notify"], [self.channel, key])
        self._wrote()
        return written

    def store_results(self, items: Sequence[ResultWrite]) -> list[bool]:
        """Upsert each of ``items`` as :meth:`store_result` does, in one transaction."""
        if len(items) <= 1:
            return super().store_results(items)
        written: list[bool] = []
        with self._transaction(f"store {len(items)} results") as conn:
            for item in items:
                key = self._id(item.task_id)
                params = {
                    "id": key,
                    "record": bytes(item.record),
                    "final": item.final,
                    "ttl": item.expires,
                }
                done = conn.execute(self._sql["store"], params).fetchone() is not None
                if done and item.final:
                    conn.execute(self._sql["notify"], [self.channel, key])
                written.append(done)
        self._wrote()
        return written

    def get_result(self, task_id: str) -> tuple[bytes, bool] | None:
        """Read the live result of ``task_id``."""
        with self._transaction(f"read the result of {task_id}") as conn:
            row = conn.execute(self._sql["get_result"], [self._id(task_id)]).fetchone()
        return None if row is None else (bytes(row[0]), bool(row[1]))

    def get_results(self, task_ids: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        """Read the results of ``task_ids`` in one query; in order."""
        if not task_ids:
            return []
        keys = [self._id(t) for t in task_ids]
        with self._transaction(f"read {len(task_ids)} results") as conn:
            rows = conn.execute(self._sql["get_results"], [keys]).fetchall()
        found = {row[0]: (bytes(row[1]), bool(row[2])) for row in rows}
        return [found.get(key) for key in keys]

    def _final(self, task_id: str) -> bytes | None:
        found = self.get_result(task_id)
        return found[0] if found is not None and found[1] else None

    def wait_result(self, task_id: str, timeout: float) -> bytes | None:
        """Read; if not final, wait for its NOTIFY on the shared listening connection.

        The listener LISTENs before the second read, so a record committed
        after that read is notified; a lost listening connection makes every
        waiter read again once it is back.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        found = self._final(task_id)
        if found is not None or timeout <= 0:
            return found
        listener = self.listener()
        with (
            self._errors(f"wait for the result of {task_id}"),
            listener.waiting(self._id(task_id)) as waiter,
        ):
            while listener.ready(waiter, deadline):
                found = self._final(task_id)
                if found is not None or not listener.wait(waiter, deadline):
                    return found
            return None

    def listener(self) -> Listener:
        """The listening connection's keeper, shared by every :meth:`wait_result` call."""
        with self._lock:
            if self._listener is None:
                self._listener = Listener(lambda: self._connect(autocommit=True), self.channel)
            return self._listener

    def forget(self, task_id: str) -> None:
        """Delete the result of ``task_id``."""
        with self._transaction(f"forget the result of {task_id}") as conn:
            conn.execute(self._sql["forget"], [self._id(task_id)])

    # -- coordination ----------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """Insert, or write over an expired row; False if a live row is there."""
        params = {"key": self._key(key), "value": bytes(value), "ttl": ttl}
        with self._transaction(f"set {key!r}") as conn:
            stored = conn.execute(self._sql["set_if_absent"], params).fetchone() is not None
        self._wrote()
        return stored

    def get(self, key: str) -> bytes | None:
        """Read the live value (a counter in decimal ASCII) under ``key``."""
        with self._transaction(f"read {key!r}") as conn:
            row = conn.execute(self._sql["get"], [self._key(key)]).fetchone()
        if row is None:
            return None
        value, num = row
        if value is not None:
            return bytes(value)
        return None if num is None else str(num).encode()

    def put(self, key: str, value: bytes, ttl: float) -> None:
        """Upsert ``value`` under ``key``."""
        params = {"key": self._key(key), "value": bytes(value), "ttl": ttl}
        with self._transaction(f"write {key!r}") as conn:
            conn.execute(self._sql["put"], params)
        self._wrote()

    def delete(self, key: str) -> None:
        """Delete ``key``'s row and, for a set, its members."""
        with self._transaction(f"delete {key!r}") as conn:
            conn.execute(self._sql["delete_key"], [self._key(key)])
            conn.execute(self._sql["delete_members"], [self._key(key)])

    def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """One upsert: add ``amount`` (start over if the counter expired)."""
        params = {"key": self._key(key), "amount": amount, "ttl": ttl}
        with self._transaction(f"increment {key!r}") as conn:
            row = conn.execute(self._sql["incr"], params).fetchone()
        self._wrote()
        assert row is not None
        return int(row[0])

    def add_member(self, key: str, member: str, *, ttl: float) -> tuple[bool, int]:
        """Lock the set's row (an upsert), insert the member, count it: one transaction."""
        name = self._key(key)
        with self._transaction(f"add to {key!r}") as conn:
            row = conn.execute(self._sql["lock_set"], {"key": name, "ttl": ttl}).fetchone()
            assert row is not None
            size = int(row[0])
            if size == 0:
                # A new (or expired) set: members left by an earlier one do not count.
                conn.execute(self._sql["delete_members"], [name])
            added = conn.execute(self._sql["add_member"], [name, member]).rowcount == 1
            if added:
                counted = conn.execute(self._sql["count_member"], [name]).fetchone()
                assert counted is not None
                size = int(counted[0])
        self._wrote()
        return added, size

    def members(self, key: str) -> set[str]:
        """Read the members of the live set ``key``."""
        with self._transaction(f"read the members of {key!r}") as conn:
            rows = conn.execute(self._sql["members"], [self._key(key)]).fetchall()
        return {str(row[0]) for row in rows}

    # -- leases -------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> int | None:
        """One upsert: take a free or expired lease (a new token) or renew one's own."""
        params = {"name": self._key(name), "owner": owner, "ttl": ttl}
        with self._transaction(f"acquire the lease {name!r}") as conn:
            row = conn.execute(self._sql["acquire"], params).fetchone()
        self._wrote()
        return None if row is None else int(row[0])

    def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend the lease if ``owner`` holds it, live."""
        params = {"name": self._key(name), "owner": owner, "ttl": ttl}
        with self._transaction(f"renew the lease {name!r}") as conn:
            return conn.execute(self._sql["renew"], params).fetchone() is not None

    def release_lease(self, name: str, owner: str) -> None:
        """Delete the lease if ``owner`` holds it."""
        with self._transaction(f"release the lease {name!r}") as conn:
            conn.execute(self._sql["release"], [self._key(name), owner])

    def lease_holder(self, name: str) -> tuple[str, int] | None:
        """Read the live holder of ``name``."""
        with self._transaction(f"read the lease {name!r}") as conn:
            row = conn.execute(self._sql["holder"], [self._key(name)]).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    claim_fenced = fenced.claim_fenced
    put_fenced = fenced.put_fenced

    # -- flow control (mqtasks.backend.postgres.flow) -----------------------------------------

    take_token = flow.take_token
    peek_tokens = flow.peek_tokens
    acquire_slot = flow.acquire_slot
    renew_slots = flow.renew_slots
    release_slot = flow.release_slot
    slots_held = flow.slots_held

    # -- revocations -------------------------------------------------------------------------

    def add_revocation(self, task_id: str, *, terminate: bool, ttl: float) -> None:
        """Upsert the revocation and NOTIFY it, in one transaction."""
        key = self._id(task_id)
        params = {"id": key, "terminate": terminate, "ttl": ttl}
        notice = encode_notice(key, terminate=terminate, ttl=ttl)
        with self._transaction(f"revoke {task_id}") as conn:
            conn.execute(self._sql["revoke"], params)
            conn.execute(self._sql["notify"], [self.revocation_channel, notice])
        self._wrote()

    def remove_revocation(self, task_id: str) -> None:
        """Delete the revocation and NOTIFY the removal, in one transaction."""
        key = self._id(task_id)
        with self._transaction(f"remove the revocation of {task_id}") as conn:
            conn.execute(self._sql["unrevoke"], [key])
            conn.execute(self._sql["notify"], [self.revocation_channel, encode_notice(key)])

    def revocation(self, task_id: str) -> Revocation | None:
        """Read the live revocation of ``task_id``."""
        with self._transaction(f"read the revocation of {task_id}") as conn:
            row = conn.execute(self._sql["revocation"], [self._id(task_id)]).fetchone()
        return None if row is None else Revocation(task_id, bool(row[0]), float(row[1]))

    def revocations(self) -> list[Revocation]:
        """Read this backend's live revocations (its ``key_prefix``)."""
        prefix = self.key_prefix
        with self._transaction("read the revocations") as conn:
            rows = conn.execute(self._sql["revocations"], [prefix]).fetchall()
        return [Revocation(str(r[0])[len(prefix) :], bool(r[1]), float(r[2])) for r in rows]

    def watch_revocations(self, listener: RevocationListener) -> Watch:
        """LISTEN for revocations on a connection (and in a thread) of its own."""
        listen = listen_notifies(
            lambda: self._connect(autocommit=True), self.revocation_channel, self.key_prefix
        )
        return WatchThread(f"mqtasks-revocations-{self.table_prefix}", listen, listener)
