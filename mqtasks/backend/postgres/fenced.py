"""The writes of the PostgreSQL backend fenced by a lease: claims and values written only by its holder.

Each operation is one statement (statements ``claim_fenced`` and ``put_fenced``
of :mod:`.schema`): it locks the lease's row of ``<t>leases`` ``FOR SHARE``
only if it is live with the caller's token, and writes rows of ``<t>kv`` only
if it found it. An acquire of the lease by another owner updates that row, so
it waits for the write's commit, and a write after it reads the row anew and
finds another token: a holder that lost its lease without knowing it writes
nothing. A claim is the holder's token in decimal ASCII, as a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...exceptions import BackendError

if TYPE_CHECKING:
    from . import PostgresBackend

__all__ = ["claim_fenced", "put_fenced"]


def _holder(key: str, value: Any, num: Any) -> int:
    """The token a claim's row holds (its value, or a counter's number)."""
    try:
        return int(bytes(value)) if value is not None else int(num)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"claim {key!r}: the key holds no claim") from exc


def claim_fenced(
    self: PostgresBackend, lease: str, token: int, keys: Sequence[str], ttl: float
) -> list[int] | None:
    """Check the lease's row and insert each absent key's: one statement.

    The keys go in once each and sorted, so that two claims of the same keys
    lock their rows in the same order.
    """
    names = sorted({self._key(key) for key in keys})
    params = {
        "lease": self._key(lease),
        "token": token,
        "keys": names,
        "value": str(token).encode(),
        "ttl": ttl,
    }
    with self._transaction(f"claim {len(keys)} keys under the lease {lease!r}") as conn:
        rows = conn.execute(self._sql["claim_fenced"], params).fetchall()
    if not rows:
        return None
    self._wrote()
    found = {str(key): _holder(str(key), value, num) for key, value, num in rows if key is not None}
    return [found[self._key(key)] for key in keys]


def put_fenced(
    self: PostgresBackend, lease: str, token: int, key: str, value: bytes, ttl: float
) -> bool:
    """Check the lease's row and upsert the value: one statement."""
    params = {
        "lease": self._key(lease),
        "token": token,
        "key": self._key(key),
        "value": bytes(value),
        "ttl": ttl,
    }
    with self._transaction(f"write {key!r} under the lease {lease!r}") as conn:
        stored = conn.execute(self._sql["put_fenced"], params).fetchone() is not None
    if stored:
        self._wrote()
    return stored
