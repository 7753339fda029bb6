"""The flow-control operations of the PostgreSQL backend: a token bucket and lease-based slots.

Each operation is one transaction, timed on the server's clock read once its
lock is held (``clock_timestamp()``), so it is atomic across every worker:

* a token bucket is a row of ``<t>buckets`` (tokens, ts, queued), locked by
  an upsert that returns it; the step
  (:func:`~mqtasks.backend.base.token_bucket_step`) is computed here and
  written back before the commit. The row expires once the bucket would be
  full again.
* the slots of a concurrency limit are rows of ``<t>slots`` (key, owner,
  expires_at); taking one holds a transaction-level advisory lock on the key,
  so the count and the insert cannot interleave with another taker's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..base import BucketState, TokenGrant, token_bucket_step

if TYPE_CHECKING:
    from . import PostgresBackend

__all__ = [
    "acquire_slot",
    "peek_tokens",
    "release_slot",
    "renew_slots",
    "slots_held",
    "take_token",
]


def take_token(
    self: PostgresBackend,
    key: str,
    *,
    rate: float,
    capacity: float,
    max_wait: float,
    count: int = 1,
) -> TokenGrant:
    """Lock the bucket's row (an upsert), step it, write it back: one transaction."""
    name = self._key(key)
    with self._transaction(f"take a token of {key!r}") as conn:
        row = conn.execute(self._sql["bucket_lock"], {"key": name}).fetchone()
        assert row is not None
        tokens, ts, queued, live, now = row
        state = BucketState(float(tokens), float(ts), float(queued)) if live else None
        grant, new, keep = token_bucket_step(
            state, float(now), rate=rate, capacity=capacity, max_wait=max_wait, count=count
        )
        params = {"key": name, "tokens": new.tokens, "ts": new.ts, "queued": new.queued}
        conn.execute(self._sql["bucket_write"], {**params, "ttl": keep})
    self._wrote()
    return grant


def peek_tokens(self: PostgresBackend, key: str, *, rate: float, capacity: float) -> float:
    """Read the bucket's row, if live, and count its tokens now."""
    with self._transaction(f"read the bucket {key!r}") as conn:
        row = conn.execute(self._sql["bucket_peek"], [self._key(key)]).fetchone()
    if row is None:
        return capacity
    tokens, ts, now = (float(v) for v in row)
    return min(capacity, tokens + max(0.0, now - ts) * rate)


def acquire_slot(
    self: PostgresBackend, key: str, owner: str, *, limit: int, ttl: float
) -> tuple[bool, int]:
    """Under the key's advisory lock: count the others' live slots, insert ``owner``'s if one is free."""
    name = self._key(key)
    params = {"key": name, "owner": owner, "ttl": ttl, "limit": limit}
    with self._transaction(f"acquire a slot of {key!r}") as conn:
        conn.execute(self._sql["slot_lock"], [f"{self._tables['slots']}:{name}"])
        row = conn.execute(self._sql["slot_acquire"], params).fetchone()
    assert row is not None
    self._wrote()
    taken, others = int(row[0]), int(row[1])
    return taken > 0, others + taken


def renew_slots(self: PostgresBackend, key: str, owners: Sequence[str], ttl: float) -> int:
    """Extend the live slots of ``owners`` (one statement)."""
    if not owners:
        return 0
    params = {"key": self._key(key), "owners": list(owners), "ttl": ttl}
    with self._transaction(f"renew the slots of {key!r}") as conn:
        return conn.execute(self._sql["slot_renew"], params).rowcount


def release_slot(self: PostgresBackend, key: str, owner: str) -> None:
    """Delete ``owner``'s slot row."""
    with self._transaction(f"release a slot of {key!r}") as conn:
        conn.execute(self._sql["slot_release"], [self._key(key), owner])


def slots_held(self: PostgresBackend, key: str) -> int:
    """Count the live slot rows of ``key``."""
    with self._transaction(f"read the slots of {key!r}") as conn:
        row = conn.execute(self._sql["slots_held"], [self._key(key)]).fetchone()
    return 0 if row is None else int(row[0])
