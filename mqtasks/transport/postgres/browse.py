"""Reading a ``postgresql://`` queue's rows in place: the dead-letter commands'
browse and take (``mqtasks dlq ls``, ``replay``, ``purge``)."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..base import StoredMessage, Taken

if TYPE_CHECKING:
    from . import PostgresTransport

__all__ = ["stored", "take_messages"]


@contextlib.contextmanager
def take_messages(transport: PostgresTransport, queue: str) -> Iterator[Iterator[Taken]]:
    """Take ``queue``'s messages oldest first, each leased to this call until removed
    or handed back at the end."""
    owner = f"take:{uuid.uuid4().hex}"
    taken: list[int] = []
    with transport.errors(f"read {queue!r}"):
        transport.pool()
        conn = transport.connect(autocommit=True)

    def remove(row_id: int) -> None:
        with transport.errors(f"remove a message from {queue!r}"):
            conn.execute(transport.sql["remove"], {"id": row_id, "owner": owner})
        with contextlib.suppress(ValueError):
            taken.remove(row_id)

    def messages() -> Iterator[Taken]:
        after_at: Any = "-infinity"
        after = 0
        while True:
            params = {
                "queue": queue,
                "owner": owner,
                "lease": transport.lease,
                "after_at": after_at,
                "after": after,
            }
            with transport.errors(f"read {queue!r}"):
                row = conn.execute(transport.sql["take_next"], params).fetchone()
            if row is None:
                return
            after_at, after = row[10], int(row[0])
            taken.append(after)
            yield stored(row), functools.partial(remove, after)

    try:
        yield messages()
    finally:
        try:
            if taken:
                with transport.errors(f"hand messages back to {queue!r}"):
                    conn.execute(transport.sql["untake"], {"owner": owner, "ids": taken})
        finally:
            conn.close()


def stored(row: Sequence[Any]) -> StoredMessage:
    """A :class:`~mqtasks.transport.delivery.StoredMessage` of a row read with
    :data:`~mqtasks.transport.postgres.schema.COLUMNS`."""
    return StoredMessage(
        body=bytes(row[9]),
        message_id=row[5],
        headers=dict(row[6]) if isinstance(row[6], dict) else {},
        content_type=row[7],
        content_encoding=row[8],
    )
