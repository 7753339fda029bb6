"""The PG profile's queue depths: rows of a run's queue counted by place, on the shared PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from mqtasks.transport.postgres.schema import TABLE
from reliability.postgres_server import queue_depths
from tests._helpers.brokers import require_broker, unique_name


@pytest.fixture
def table() -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A message table of the broker's shape, of this test's own, dropped afterwards."""
    url = require_broker("postgresql")
    name = unique_name("depths").replace("-", "_") + "_messages"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL(TABLE).format(t=sql.Identifier(name)))  # type: ignore[arg-type]
        try:
            yield conn, name
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def _row(conn: psycopg.Connection[Any], table: str, queue: str, run_at: str, lease: str) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (queue, run_at, locked_until, headers, body) "
            "VALUES (%s, now() + %s::interval, now() + %s::interval, '{{}}', '')"
        ).format(sql.Identifier(table)),
        (queue, run_at, lease),
    )


def test_rows_counted_by_place(table: tuple[psycopg.Connection[Any], str]) -> None:
    """Ready (a lease run out included), delayed, leased and dead rows; other queues ignored."""
    conn, name = table
    _row(conn, name, "rel.q", "0 s", "-1 s")  # ready: never leased (its lease cleared next)
    conn.execute(sql.SQL("UPDATE {} SET locked_until = NULL").format(sql.Identifier(name)))
    _row(conn, name, "rel.q", "-5 s", "-1 s")  # a killed worker's lease ran out: ready
    _row(conn, name, "rel.q", "60 s", "-1 s")  # a retry waiting: delayed
    _row(conn, name, "rel.q", "-5 s", "30 s")  # held by a live worker: unacked
    _row(conn, name, "rel.q", "-5 s", "30 s")
    _row(conn, name, "rel.q.dlq", "0 s", "-1 s")  # a dead letter
    _row(conn, name, "rel.other", "0 s", "-1 s")  # another run's queue
    assert queue_depths(conn, name, "rel.q") == {"ready": 2, "delayed": 1, "unacked": 2, "dead": 1}


def test_missing_table_is_empty(table: tuple[psycopg.Connection[Any], str]) -> None:
    """Before any worker created the table, every depth is 0 (not an error)."""
    conn, name = table
    assert queue_depths(conn, name + "_nope", "rel.q") == {
        "ready": 0,
        "delayed": 0,
        "unacked": 0,
        "dead": 0,
    }
