"""Fixtures: each state backend in turn (memory, the local Redis, the local PostgreSQL),
under a key prefix or table prefix no other test uses, cleaned up after the test."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from mqtasks.backend import Backend, resolve
from tests._helpers.brokers import REDIS_URL, RUN_ID, require_broker, unique_name
from tests._helpers.redis import delete_keys

#: The local PostgreSQL (trust authentication) used by integration tests.
POSTGRES_URL = os.environ.get(
    "MQTASKS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

_tables = itertools.count()


def require_postgres() -> str:
    """Return the local PostgreSQL's URL; skip if unreachable, but fail under CI."""
    parts = urlsplit(POSTGRES_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            pass
    except OSError:
        message = f"PostgreSQL not reachable at {parts.hostname}:{parts.port}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires the real services", pytrace=False)
        pytest.skip(message)
    return POSTGRES_URL


def table_prefix() -> str:
    """A table prefix no other test run uses."""
    return f"mqt_{RUN_ID}_{next(_tables)}_"


def drop_tables(prefix: str) -> None:
    """Drop every table and sequence of the local PostgreSQL whose name starts with ``prefix``."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, relkind FROM pg_class WHERE starts_with(relname, %s)"
            " AND relkind IN ('r', 'S')",
            [prefix],
        ).fetchall()
        for name, kind in rows:
            what = "TABLE" if kind == "r" else "SEQUENCE"
            conn.execute(
                sql.SQL("DROP {} IF EXISTS {}").format(sql.SQL(what), sql.Identifier(name))
            )


def postgres_url(prefix: str) -> str:
    """The local PostgreSQL with ``?table_prefix=prefix``."""
    return f"{require_postgres()}?table_prefix={prefix}"


@contextlib.contextmanager
def backend_app_options(kind: str) -> Iterator[dict[str, Any]]:
    """App arguments for a result backend of kind ``memory``, ``redis`` or ``postgresql``,
    under names of the caller's own; Redis keys and PostgreSQL tables deleted at the end."""
    if kind == "memory":
        yield {"backend": "memory://"}
    elif kind == "redis":
        require_broker("redis")
        prefix = unique_name("app-backend") + ":"
        yield {"backend": REDIS_URL, "backend_key_prefix": prefix}
        delete_keys(prefix)
    elif kind == "postgresql":
        prefix = table_prefix()
        yield {"backend": postgres_url(prefix)}
        drop_tables(prefix)
    else:
        raise ValueError(kind)


@pytest.fixture
def make_backend() -> Iterator[Callable[[str], Backend]]:
    """A factory: a backend of kind ``memory``, ``redis`` or ``postgresql`` with names of its
    own; Redis keys and PostgreSQL tables are deleted at teardown."""
    made: list[Backend] = []
    cleanups: list[Callable[[], None]] = []

    def make(kind: str) -> Backend:
        if kind == "memory":
            backend = resolve("memory://")
        elif kind == "redis":
            require_broker("redis")
            prefix = unique_name("backend") + ":"
            backend = resolve(REDIS_URL, key_prefix=prefix)
            cleanups.append(lambda: delete_keys(prefix))
        elif kind == "postgresql":
            prefix = table_prefix()
            backend = resolve(postgres_url(prefix))
            cleanups.append(lambda: drop_tables(prefix))
        else:
            raise ValueError(kind)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    for cleanup in cleanups:
        cleanup()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest, make_backend: Callable[[str], Backend]) -> Backend:
    """Each state backend in turn: memory, the local Redis, the local PostgreSQL."""
    return make_backend(request.param)
