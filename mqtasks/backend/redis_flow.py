"""The flow-control operations of the Redis backend: a token bucket and lease-based slots.

Each operation is one Lua script (one ``EVALSHA``), timed on the server's
clock (``TIME``), so it is atomic across every worker. Keys are coordination
keys of the backend (``<p>key:<key>``):

* a token bucket is a hash ``t`` (tokens), ``ts`` (when counted), ``q`` (the
  deferral schedule), in seconds; it expires once it would be full again, so
  an idle bucket costs nothing;
* the slots of a concurrency limit are a sorted set of owners scored by their
  lease's expiry (seconds); expired owners are dropped by the next operation,
  and the set expires with its last lease.

:func:`mqtasks.backend.base.token_bucket_step` is the reference of the bucket
script: the same steps, in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from .base import TokenGrant

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = [
    "FLOW_SCRIPTS",
    "acquire_slot",
    "peek_tokens",
    "release_slot",
    "renew_slots",
    "slots_held",
    "take_token",
]

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
"""

# KEYS[1] bucket. ARGV[1] rate (tokens per second), ARGV[2] capacity, ARGV[3] max wait (s),
# ARGV[4] most tokens to take. Replies {granted, wait, tokens, taken}, wait and tokens as
# strings: Redis would cut Lua numbers to integers.
_TAKE_TOKEN = (
    _NOW
    + """
local rate, capacity, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = 1 / rate
local state = redis.call('HMGET', KEYS[1], 't', 'ts', 'q')
local tokens, queued = capacity, 0
if state[1] then
  tokens = math.min(capacity, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  queued = tonumber(state[3])
end
local granted, wait, taken = 1, 0, 1
if tokens >= 1 then
  taken = math.max(1, math.min(tonumber(ARGV[4]), math.floor(tokens - capacity / 2)))
  tokens = tokens - taken
else
  wait = (1 - tokens) * interval
  if wait <= max_wait then
    tokens = tokens - 1
  else
    granted, taken = 0, 0
    queued = math.max(now + wait, queued + interval)
    wait = queued - now
  end
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now), 'q', tostring(queued))
local keep = math.max((capacity - tokens) * interval, queued - now) + 1
redis.call('PEXPIRE', KEYS[1], math.ceil(keep * 1000))
return {granted, tostring(wait), tostring(tokens), taken}
"""
)

# KEYS[1] bucket. ARGV[1] rate, ARGV[2] capacity: the tokens now, as a string.
_PEEK_TOKENS = (
    _NOW
    + """
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
if not state[1] then return tostring(capacity) end
return tostring(math.min(capacity, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate))
"""
)

# KEYS[1] slots. ARGV[1] owner, ARGV[2] limit, ARGV[3] ttl (s): {acquired, held}.
_ACQUIRE_SLOT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local ttl = tonumber(ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if held >= tonumber(ARGV[2]) then return {0, held} end
  held = held + 1
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return {1, held}
"""
)

# KEYS[1] slots. ARGV[1] ttl (s), ARGV[2...] owners: how many live ones were renewed.
_RENEW_SLOTS = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
end
if renewed > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000)) end
return renewed
"""
)

# KEYS[1] slots: the live ones.
_SLOTS_HELD = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"

#: The scripts, by name, that :class:`~mqtasks.backend.redis.RedisBackend` registers.
FLOW_SCRIPTS = {
    "take_token": _TAKE_TOKEN,
    "peek_tokens": _PEEK_TOKENS,
    "acquire_slot": _ACQUIRE_SLOT,
    "renew_slots": _RENEW_SLOTS,
    "slots_held": _SLOTS_HELD,
}


_TAKE_TOKEN_SHA = hashlib.sha1(_TAKE_TOKEN.encode()).hexdigest()


def take_token(
    self: RedisBackend, key: str, *, rate: float, capacity: float, max_wait: float, count: int = 1
) -> TokenGrant:
    """One bucket step (one script), on the server's clock."""
    args = (self.key(key), repr(rate), repr(capacity), repr(max_wait), str(count))
    with self._errors(f"take a token of {key!r}"):
        granted, wait, tokens, taken = _take_token_call(self, args)
    return TokenGrant(bool(granted), float(wait), float(tokens), int(taken))


def _take_token_call(self: RedisBackend, args: tuple[str, ...]) -> Any:
    """``EVALSHA`` straight on a pooled connection (the script loaded if Redis lacks it).

    It runs once per limited task: the client's per-command path (its retry
    wrapper and bookkeeping) costs more CPU than the round trip, as for the
    result backend's stores. The reply is read whole, so the connection goes
    back to the pool clean, or is dropped on any other error.
    """
    pool = self.client().connection_pool
    conn = pool.get_connection()
    try:
        command = conn.pack_command("EVALSHA", _TAKE_TOKEN_SHA, 1, *args)
        conn.send_packed_command(command, check_health=False)
        try:
            return conn.read_response()
        except redis.exceptions.NoScriptError:  # after a restart or SCRIPT FLUSH
            conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", _TAKE_TOKEN))
            conn.read_response()
            conn.send_packed_command(command, check_health=False)
            return conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def peek_tokens(self: RedisBackend, key: str, *, rate: float, capacity: float) -> float:
    """Read the bucket's tokens now (one script; nothing written)."""
    with self._errors(f"read the bucket {key!r}"):
        return float(
            self._script("peek_tokens")(keys=[self.key(key)], args=[repr(rate), repr(capacity)])
        )


def acquire_slot(
    self: RedisBackend, key: str, owner: str, *, limit: int, ttl: float
) -> tuple[bool, int]:
    """Drop the expired slots, count, and add ``owner`` if one is free (one script)."""
    with self._errors(f"acquire a slot of {key!r}"):
        acquired, held = self._script("acquire_slot")(
            keys=[self.key(key)], args=[owner, limit, repr(ttl)]
        )
    return bool(acquired), int(held)


def renew_slots(self: RedisBackend, key: str, owners: Sequence[str], ttl: float) -> int:
    """``ZADD XX`` each live owner's new expiry (one script)."""
    if not owners:
        return 0
    with self._errors(f"renew the slots of {key!r}"):
        return int(self._script("renew_slots")(keys=[self.key(key)], args=[repr(ttl), *owners]))


def release_slot(self: RedisBackend, key: str, owner: str) -> None:
    """``ZREM`` the owner."""
    with self._errors(f"release a slot of {key!r}"):
        self.client().zrem(self.key(key), owner)


def slots_held(self: RedisBackend, key: str) -> int:
    """``ZCOUNT`` the unexpired owners (one script, on the server's clock)."""
    with self._errors(f"read the slots of {key!r}"):
        return int(self._script("slots_held")(keys=[self.key(key)]))
