"""What only the PostgreSQL backend has: its sweep of expired rows and its listening connections."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import sql

from mqtasks.backend import resolve
from mqtasks.backend.postgres import PostgresBackend
from tests._helpers.wait import wait_for

from .conftest import POSTGRES_URL, drop_tables, postgres_url, table_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def make_postgres() -> Iterator[Callable[..., PostgresBackend]]:
    """A factory of PostgreSQL backends with tables of their own, dropped at teardown."""
    made: list[PostgresBackend] = []

    def make(**options: object) -> PostgresBackend:
        prefix = table_prefix()
        backend = PostgresBackend(postgres_url(prefix), **options)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
        drop_tables(backend.table_prefix)


def rows(backend: PostgresBackend, table: str) -> int:
    """The number of rows, live or expired, in one of ``backend``'s tables."""
    with psycopg.connect(POSTGRES_URL) as conn:
        name = sql.Identifier(f"{backend.table_prefix}{table}")
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
    assert row is not None
    return int(row[0])


def test_sweep_deletes_expired_rows_and_keeps_live_ones(
    make_postgres: Callable[..., PostgresBackend],
) -> None:
    # Given an expired and a live row in each table (and an expired set's members)
    backend = make_postgres(sweep_every=0)
    for name, ttl in (("old", 0.2), ("new", 60)):
        backend.store_result(name, b"x", final=True, expires=ttl)
        backend.put(name, b"x", ttl)
        backend.add_member(f"{name}-set", "m", ttl=ttl)
        backend.acquire_lease(name, "o", ttl)
    wait_for(lambda: backend.get_result("old") is None, "the short rows to expire")
    assert rows(backend, "results") == 2
    assert rows(backend, "members") == 2

    # When the sweep runs
    backend.sweep()

    # Then the expired rows are gone, the live ones stay
    assert (rows(backend, "results"), rows(backend, "leases"), rows(backend, "members")) == (
        1,
        1,
        1,
    )
    assert rows(backend, "kv") == 2  # "new" and "new-set"
    assert backend.get_result("new") == (b"x", True)
    assert backend.members("new-set") == {"m"}


def test_writes_sweep_now_and_then(make_postgres: Callable[..., PostgresBackend]) -> None:
    backend = make_postgres(sweep_every=3)
    backend.store_result("a", b"x", final=True, expires=0.2)
    backend.store_result("b", b"x", final=True, expires=0.2)
    wait_for(lambda: backend.get_result("b") is None, "the results to expire")
    assert rows(backend, "results") == 2

    backend.store_result("c", b"x", final=True, expires=60)  # the third write sweeps

    assert rows(backend, "results") == 1


def listening(backend: PostgresBackend) -> list[int]:
    """Server process ids of the connections LISTENing on ``backend``'s channel."""
    with psycopg.connect(POSTGRES_URL) as conn:
        found = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s",
            [f'LISTEN "{backend.channel}"'],
        ).fetchall()
    return [int(row[0]) for row in found]


def test_waiters_share_one_listening_connection(
    make_postgres: Callable[..., PostgresBackend],
) -> None:
    # Given four calls waiting for four tasks
    backend = make_postgres()
    ids = [f"t{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        waits = [pool.submit(backend.wait_result, task_id, 30) for task_id in ids]
        wait_for(lambda: listening(backend), "a listening connection")

        # Then one connection listens for them all
        assert len(listening(backend)) == 1

        # and each is woken by its own result
        for task_id in ids:
            backend.store_result(task_id, task_id.encode(), final=True, expires=60)
        assert [w.result(timeout=30) for w in waits] == [t.encode() for t in ids]

    # Closed with the backend
    backend.close()
    wait_for(lambda: not listening(backend), "the listening connection to close", timeout=5)


def test_a_waiter_reads_again_after_the_listening_connection_is_lost(
    make_postgres: Callable[..., PostgresBackend],
) -> None:
    # Given a call waiting for a result
    backend = make_postgres()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(backend.wait_result, "t", 30)
        pids = wait_for(lambda: listening(backend), "a listening connection")

        # When the server drops its listening connection, and the result is stored
        with psycopg.connect(POSTGRES_URL) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [pids[0]])
        backend.store_result("t", b"x", final=True, expires=60)

        # Then the waiter gets it all the same
        assert waiting.result(timeout=30) == b"x"


def test_the_default_table_prefix_and_a_given_one() -> None:
    default = resolve("postgresql://u@127.0.0.1/db")
    given = PostgresBackend("postgresql://u@127.0.0.1/db?table_prefix=url_", table_prefix="arg_")

    assert isinstance(default, PostgresBackend)
    assert default.table_prefix == "mqtasks_"
    assert default.channel == "mqtasks_results"
    assert given.table_prefix == "arg_"
