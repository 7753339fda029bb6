"""The database file of ``sqlite://``: its path from the URL, its connections and its table.

Every connection runs in WAL mode (readers never wait for the writer, and the
writer never waits for readers), waits ``busy_timeout`` for the write lock
instead of failing at once, and is in autocommit mode: each write either runs
alone or inside an explicit ``BEGIN IMMEDIATE`` transaction, which takes the
write lock up front so two processes never both read a row as free and both
claim it.

One table holds every message of every queue (dead-letter queues included);
a message's state is its columns:

* ready: ``locked_until`` NULL and ``run_at`` past;
* held for a delay: ``locked_until`` NULL and ``run_at`` still to come;
* in flight: ``locked_until`` set (the lease of the consumer ``locked_by``).

A second table, ``mqtasks_consumers``, has a row per live consumer and queue,
renewed with the consumer's leases, so ``mqtasks status`` can count consumers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._url import mask_url
from ...exceptions import ConfigurationError, ConnectionFailed, TransportError

__all__ = [
    "MIN_SQLITE",
    "SCHEMA",
    "SQLITE_ERRORS",
    "connect",
    "database_path",
    "immediate",
    "translate_sqlite",
    "url_options",
]

#: The oldest SQLite this transport runs on: ``UPDATE ... RETURNING`` (3.35).
MIN_SQLITE = (3, 35, 0)

#: Errors of the sqlite3 module (locked past the busy timeout, disk full, I/O).
SQLITE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)

#: The table and indexes, created on first use of a file (idempotent).
SCHEMA = """
CREATE TABLE IF NOT EXISTS mqtasks_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT,
    headers TEXT NOT NULL,
    content_type TEXT,
    content_encoding TEXT,
    priority INTEGER,
    level INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL,
    published_at REAL,
    run_at REAL NOT NULL,
    locked_until REAL,
    locked_by TEXT,
    returns INTEGER NOT NULL DEFAULT 0,
    redelivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS mqtasks_messages_ready
    ON mqtasks_messages (queue, level DESC, run_at, id) WHERE locked_until IS NULL;
CREATE INDEX IF NOT EXISTS mqtasks_messages_due
    ON mqtasks_messages (queue, run_at) WHERE locked_until IS NULL;
CREATE INDEX IF NOT EXISTS mqtasks_messages_leased
    ON mqtasks_messages (locked_until) WHERE locked_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS mqtasks_messages_holder
    ON mqtasks_messages (locked_by) WHERE locked_by IS NOT NULL;
CREATE TABLE IF NOT EXISTS mqtasks_consumers (
    consumer_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    alive_until REAL NOT NULL,
    PRIMARY KEY (consumer_id, queue)
);
"""


def database_path(url: str) -> Path:
    """Return the absolute path of the database file ``url`` names.

    ``sqlite:///tasks.db`` is relative to the current directory (resolved
    once, here), ``sqlite:////var/lib/app/tasks.db`` absolute, as in
    SQLAlchemy's URLs.

    Raises:
        ConfigurationError: The URL names no file (or an in-memory database,
            which no second process could share).
    """
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigurationError(
            f"{mask_url(url)}: a sqlite:// URL names a local file, not a host: write "
            "sqlite:///relative/tasks.db or sqlite:////absolute/tasks.db."
        )
    raw = unquote(parts.path)[1:] if parts.path.startswith("/") else unquote(parts.path)
    if not raw or raw == ":memory:" or raw.startswith("file:"):
        raise ConfigurationError(
            f"{mask_url(url)}: name a database file (sqlite:///tasks.db); an in-memory "
            "SQLite database is private to one connection, use memory:// instead."
        )
    return Path(os.path.abspath(raw))


def url_options(url: str) -> dict[str, str]:
    """Return the transport options a URL's query string sets (``?lease=60``)."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def _check_directory(path: Path, url: str) -> None:
    """Refuse a file SQLite could not write, before SQLite says so less clearly."""
    directory = path.parent
    if path.is_dir():
        raise ConfigurationError(
            f"{mask_url(url)}: {str(path)!r} is a directory; name a database file in it "
            f"(sqlite:///{path}/tasks.db)."
        )
    if not directory.is_dir():
        raise ConfigurationError(
            f"{mask_url(url)}: the directory {str(directory)!r} of the database file does "
            "not exist; create it (the worker and the publishers must all be able to "
            "write there)."
        )
    if not os.access(directory, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.R_OK | os.W_OK)
    ):
        raise ConfigurationError(
            f"{mask_url(url)}: {str(path)!r} is not writable by this user; SQLite in WAL "
            "mode writes the file and its -wal and -shm files beside it, so give every "
            "process of the app write access to the file and to its directory."
        )


def connect(path: Path, url: str, *, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    """Open a connection to ``path`` in WAL mode, autocommit, creating the table.

    Raises:
        ConfigurationError: The file cannot be written, or SQLite is too old.
        ConnectionFailed: SQLite cannot open it (locked past the busy timeout,
            not a database).
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise ConfigurationError(
            f"sqlite:// needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later (UPDATE ... "
            f"RETURNING); this Python links SQLite {sqlite3.sqlite_version}."
        )
    _check_directory(path, url)
    try:
        conn = sqlite3.connect(
            str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise _open_error(exc, path, url) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigurationError(
                f"{str(path)!r}: SQLite refused WAL mode (journal_mode stays {mode!r}); "
                "put the database on a local file system that supports shared memory."
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.executescript(SCHEMA)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error) and "unable to open" in str(exc):
            raise ConfigurationError(
                f"{mask_url(url)}: SQLite cannot create or open {str(path)!r} ({exc}); "
                "the file and its directory must be writable by this user (in WAL mode "
                "SQLite also writes its -wal and -shm files beside it)."
            ) from exc
        if isinstance(exc, sqlite3.Error):
            raise ConnectionFailed(f"cannot use the SQLite database {str(path)!r}: {exc}") from exc
        raise
    return conn


def _open_error(exc: sqlite3.Error, path: Path, url: str) -> Exception:
    """The error to raise when SQLite cannot open or set up ``path``."""
    if "unable to open" in str(exc):
        return ConfigurationError(
            f"{mask_url(url)}: SQLite cannot create or open {str(path)!r} ({exc}); the "
            "file and its directory must be writable by this user (in WAL mode SQLite "
            "also writes its -wal and -shm files beside it)."
        )
    return ConnectionFailed(f"cannot use the SQLite database {str(path)!r}: {exc}")


@contextlib.contextmanager
def translate_sqlite(path: Path, what: str) -> Iterator[None]:
    """Turn sqlite3 errors into :class:`~mqtasks.exceptions.TransportError` subclasses."""
    try:
        yield
    except (TransportError, ConfigurationError):
        raise
    except sqlite3.OperationalError as exc:
        raise ConnectionFailed(f"{what}: SQLite database {str(path)!r}: {exc}") from exc
    except sqlite3.Error as exc:
        raise TransportError(f"{what}: SQLite database {str(path)!r} refused: {exc}") from exc


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A ``BEGIN IMMEDIATE`` transaction: the write lock is taken first, so what it
    reads stays true until it commits (rolled back on an error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
