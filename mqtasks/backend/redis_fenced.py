"""The writes of the Redis backend fenced by a lease: claims and values written only by its holder.

Each operation is one Lua script (one ``EVALSHA``): it reads the lease's hash
(``<p>lease:<name>``, see :mod:`mqtasks.backend.redis`) and goes on only if
the hash is there (Redis drops it when the lease expires) with the caller's
token, so nothing another holder wrote since can be overwritten by a holder
that lost its lease without knowing it. The keys written are coordination
keys (``<p>key:<key>``); a claim is the holder's token in decimal ASCII,
expiring by ``PX``.

Every key a script touches is one of its ``KEYS`` (the lease's hash first), as
in the lease scripts: under Redis Cluster a ``key_prefix`` with a hash tag
(``{mqtasks}:``) puts them all in one slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exceptions import BackendError

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["FENCED_SCRIPTS", "claim_fenced", "put_fenced"]

# The lease in KEYS[1] must be live with the token ARGV[1] (its hash expires with it).
_HELD = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
"""

# KEYS[1] lease hash, KEYS[2...] claims. ARGV[1] token, ARGV[2] ttl in ms. Sets each absent
# claim to the token (SET NX PX); replies each claim's token, in order, or nil if fenced out.
_CLAIM = (
    _HELD
    + """
local holders = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    holders[i - 1] = ARGV[1]
  else
    holders[i - 1] = redis.call('GET', KEYS[i])
  end
end
return holders
"""
)

# KEYS[1] lease hash, KEYS[2] key. ARGV[1] token, ARGV[2] value, ARGV[3] ttl in ms.
_PUT = (
    _HELD
    + """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
)

#: The scripts, by name, that :class:`~mqtasks.backend.redis.RedisBackend` registers.
FENCED_SCRIPTS = {"claim_fenced": _CLAIM, "put_fenced": _PUT}


def claim_fenced(
    self: RedisBackend, lease: str, token: int, keys: Sequence[str], ttl: float
) -> list[int] | None:
    """Check the lease's token, then ``SET NX PX`` each key to it (one script)."""
    with self._errors(f"claim {len(keys)} keys under the lease {lease!r}"):
        holders = self._script("claim_fenced")(
            keys=[self.lease_key(lease), *(self.key(k) for k in keys)],
            args=[str(token), max(1, math.ceil(ttl * 1000))],
        )
    if holders is None:
        return None
    try:
        return [int(h) for h in holders]
    except ValueError as exc:
        raise BackendError(f"claim under the lease {lease!r}: a key holds no claim") from exc


def put_fenced(
    self: RedisBackend, lease: str, token: int, key: str, value: bytes, ttl: float
) -> bool:
    """Check the lease's token, then ``SET PX`` (one script)."""
    with self._errors(f"write {key!r} under the lease {lease!r}"):
        stored = self._script("put_fenced")(
            keys=[self.lease_key(lease), self.key(key)],
            args=[str(token), bytes(value), max(1, math.ceil(ttl * 1000))],
        )
    return bool(stored)
