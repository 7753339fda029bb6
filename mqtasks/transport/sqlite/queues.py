"""Working on ``sqlite://`` queues without a consumer: counting, statistics,
purging and deleting, and the browsing and taking that dead-letter tooling
uses. Functions of a :class:`~mqtasks.transport.sqlite.SqliteTransport`.

A queue is the rows that name it: an absent queue is an empty one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..base import DLQ_SUFFIX, QueueSpec, QueueStats, StoredMessage, Taken
from .consumer import stored_headers
from .database import immediate

if TYPE_CHECKING:
    from . import SqliteTransport

__all__ = [
    "browse",
    "delayed_counts",
    "delete",
    "message_counts",
    "purge",
    "queue_stats",
    "take",
]

_STATES = (
    "SELECT "
    "SUM(locked_until IS NULL AND run_at <= :now), "
    "SUM(locked_until IS NULL AND run_at > :now), "
    "SUM(locked_until IS NOT NULL), "
    "MIN(CASE WHEN locked_until IS NULL AND run_at <= :now THEN published_at END) "
    "FROM mqtasks_messages WHERE queue = :queue"
)


def _states(t: SqliteTransport, queue: str) -> tuple[int, int, int, float | None]:
    """Ready, delayed and in-flight counts of ``queue``, and its oldest ready message's time."""
    with t.pooled(f"count {queue!r}") as conn:
        ready, delayed, held, head = conn.execute(
            _STATES, {"now": time.time(), "queue": queue}
        ).fetchone()
    return int(ready or 0), int(delayed or 0), int(held or 0), head


def _consumers(t: SqliteTransport, queue: str) -> int:
    """Live consumers of ``queue`` (those that renewed their registration in time)."""
    with t.pooled(f"count consumers of {queue!r}") as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM mqtasks_consumers WHERE queue = ? AND alive_until >= ?",
            (queue, time.time()),
        ).fetchone()
    return int(count)


def message_counts(t: SqliteTransport, specs: Sequence[QueueSpec]) -> dict[str, int]:
    """Return the number of ready messages per queue."""
    return {s.name: _states(t, s.name)[0] for s in specs}


def delayed_counts(t: SqliteTransport, specs: Sequence[QueueSpec]) -> dict[str, int]:
    """Return, per queue, how many messages wait for their ``run_at``."""
    return {s.name: _states(t, s.name)[1] for s in specs}


def queue_stats(t: SqliteTransport, specs: Sequence[QueueSpec]) -> dict[str, QueueStats]:
    """Ready, in flight, delayed and dead-lettered counts, live consumers, and the
    head's publishing time."""
    stats: dict[str, QueueStats] = {}
    for spec in specs:
        ready, delayed, held, head = _states(t, spec.name)
        dead = None
        if not spec.name.endswith(DLQ_SUFFIX):
            dead = sum(_states(t, spec.dead_letter_name)[:3])
        stats[spec.name] = QueueStats(
            spec.name,
            ready=ready,
            unacked=held,
            delayed=delayed,
            dead_lettered=dead,
            consumers=_consumers(t, spec.name),
            head_published_at=head,
        )
    return stats


def purge(t: SqliteTransport, specs: Sequence[QueueSpec]) -> int:
    """Delete the ready and delayed rows of the queues (not those in flight); return how many."""
    removed = 0
    with t.pooled("purge") as conn, immediate(conn):
        for spec in specs:
            cursor = conn.execute(
                "DELETE FROM mqtasks_messages WHERE queue = ? AND locked_until IS NULL",
                (spec.name,),
            )
            removed += cursor.rowcount
    return removed


def delete(t: SqliteTransport, specs: Sequence[QueueSpec]) -> None:
    """Delete every row of the queues and forget their declaration."""
    if not specs:
        return
    with t.pooled("delete queues") as conn, immediate(conn):
        conn.executemany("DELETE FROM mqtasks_messages WHERE queue = ?", [(s.name,) for s in specs])
    t._declared.difference_update(s.name for s in specs)


_STORED = (
    "SELECT id, body, message_id, headers, content_type, content_encoding "
    "FROM mqtasks_messages WHERE queue = ? AND locked_until IS NULL ORDER BY id"
)


def _stored(row: Sequence[Any]) -> StoredMessage:
    _, body, message_id, headers, content_type, content_encoding = row
    return StoredMessage(
        body=bytes(body),
        message_id=message_id,
        headers=stored_headers(headers),
        content_type=content_type,
        content_encoding=content_encoding,
    )


def browse(t: SqliteTransport, queue: str, limit: int | None = None) -> list[StoredMessage]:
    """Read up to ``limit`` messages of ``queue``, oldest first, untouched."""
    if limit == 0:
        return []
    with t.pooled(f"read {queue!r}") as conn:
        sql = _STORED if limit is None else _STORED + f" LIMIT {max(int(limit), 0)}"
        rows = conn.execute(sql, (queue,)).fetchall()
    return [_stored(r) for r in rows]


@contextlib.contextmanager
def take(t: SqliteTransport, queue: str) -> Iterator[Iterator[Taken]]:
    """Read ``queue``'s messages oldest first; removing one deletes its row.

    Messages are read in place, not leased: one not removed simply stays.
    """
    with t.pooled(f"read {queue!r}") as conn:
        rows = conn.execute(_STORED, (queue,)).fetchall()

    def remover(row_id: int) -> Callable[[], None]:
        def remove() -> None:
            with t.pooled(f"remove a message from {queue!r}") as conn, immediate(conn):
                conn.execute("DELETE FROM mqtasks_messages WHERE id = ?", (row_id,))

        return remove

    yield ((_stored(r), remover(r[0])) for r in rows)
