"""``redis://`` and ``rediss://``: the state backend on Redis (redis-py, one connection pool);
``redis+sentinel://`` and ``rediss+sentinel://`` find the primary through Sentinel.

Every operation that reads and writes is one Lua script or one command, so it
is atomic on the server whatever the number of workers. Expiry is Redis' own
(``PX``, ``PEXPIRE``), timed on the server's clock.

Keys, each behind the backend's ``key_prefix`` (``mqtasks:``):

* ``<p>result:<task id>``: a string, one flag byte (``F`` final, ``N`` not) then
  the record. A final write is a script that writes only if the flag byte is
  not ``F`` already, and then also
* ``<p>done:<task id>``: a list holding the final record alone, with the same
  expiry, made by the same script. :meth:`RedisBackend.wait_result` waits on it
  with one blocking ``BLMOVE`` from the list to itself, which returns the
  record and leaves it in place: every waiter wakes, a later wait returns at
  once, and a wait costs one command whether the result is there or not.
  The script also publishes the flagged record on the channel
  ``<p>db<n>:result:<task id>`` for whoever watches final writes from outside
  (channels are shared by all the databases of a server; the ``n`` keeps them
  apart); the backend itself does not listen to it.
* ``<p>key:<key>``: values, counters and sets of the coordination operations.
* ``<p>lease:<name>``: a hash ``owner``, ``token``, expiring with the lease; the
  writes fenced by a lease are in ``mqtasks.backend.redis_fenced``.
* ``<p>revoked`` and ``<p>revoked:terminate``: sorted sets of the revoked task
  ids (those to stop where running), scored by their expiry in milliseconds
  on the server's clock; expired members are dropped by the next write or
  listing. Each revocation (and removal) is published on the channel
  ``<p>db<n>:revoked`` (``mqtasks.backend.redis_pubsub`` listens to it).
* flow control (``mqtasks.backend.redis_flow``, where its scripts and
  methods are): token buckets and concurrency slots, as coordination keys.
* ``<p>lease-tokens``: the counter tokens are drawn from. One counter for all
  leases, never expiring: a per-lease counter would have to outlive its lease
  for tokens to keep growing, and leases named after task ids are many.

Redis Cluster: give a ``key_prefix`` with a hash tag (``{mqtasks}:``) so the
two keys of the store and lease scripts share a slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._redis_sentinel import connection_pool, database
from .._url import mask_url, redact
from ..exceptions import BackendError, ConfigurationError
from ..transport.tls import TLSOptions, tls_failure
from . import redis_fenced, redis_flow
from .base import Backend, ResultWrite, Revocation, RevocationListener, Watch
from .redis_pubsub import listen_pubsub
from .watch import WatchThread, encode_notice

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = ["RedisBackend"]

_FINAL = b"F"
_NOT_FINAL = b"N"

# KEYS[1] result key, KEYS[2] done list. ARGV[1] flag byte .. record, ARGV[2] expiry
# in ms, ARGV[3] channel. The first final record wins: a stored one is never
# overwritten (GETRANGE reads only its flag byte, not the record). A final write
# puts the record alone in the done list (waking the BLMOVEs blocked on it).
_STORE_RESULT = """
if redis.call('GETRANGE', KEYS[1], 0, 0) == 'F' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if string.sub(ARGV[1], 1, 1) == 'F' then
  redis.call('DEL', KEYS[2])
  redis.call('RPUSH', KEYS[2], string.sub(ARGV[1], 2))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return 1
"""

# KEYS[1] set. ARGV[1] member, ARGV[2] expiry in ms (from the set's creation).
_ADD_MEMBER = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
local size = redis.call('SCARD', KEYS[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {added, size}
"""

# KEYS[1] counter. ARGV[1] amount, ARGV[2] expiry in ms (from the counter's creation).
_INCR = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""

# KEYS[1] lease hash, KEYS[2] token counter. ARGV[1] owner, ARGV[2] ttl in ms.
# The holder renews and keeps its token; a new holder draws the next token.
_ACQUIRE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'token'))
end
if owner then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
"""

# KEYS[1] lease hash. ARGV[1] owner, ARGV[2] ttl in ms.
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] lease hash. ARGV[1] owner.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


# The server's clock in ms, and the expired revocations dropped (KEYS[1], KEYS[2]).
_NOW_SWEPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
"""

# KEYS[1] revoked, KEYS[2] revoked:terminate. ARGV[1] task id, ARGV[2] ttl in ms,
# ARGV[3] '1' to terminate, ARGV[4] channel, ARGV[5] notice. A set expires with
# its last member (every revocation is kept as long, so the newest is the last).
_REVOKE = (
    _NOW_SWEPT
    + """
local expires = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expires, ARGV[1])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[2], expires, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < tonumber(ARGV[2]) and redis.call('EXISTS', key) == 1 then
    redis.call('PEXPIRE', key, ARGV[2])
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)

# KEYS[1] revoked, KEYS[2] revoked:terminate: {now, {id, expiry...}, {terminating ids}}.
_REVOCATIONS = (
    _NOW_SWEPT
    + """
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('ZRANGE', KEYS[2], 0, -1)}
"""
)

# KEYS[1] revoked, KEYS[2] revoked:terminate. ARGV[1] task id: {now, expiry, terminating}.
_REVOCATION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then return false end
return {now, expires, redis.call('ZSCORE', KEYS[2], ARGV[1]) and 1 or 0}
"""

# What a pipeline calls the store script by (EVALSHA).
_STORE_SHA = hashlib.sha1(_STORE_RESULT.encode()).hexdigest()

_SCRIPTS = {
    "add_member": _ADD_MEMBER,
    "incr": _INCR,
    "acquire": _ACQUIRE,
    "renew": _RENEW,
    "release": _RELEASE,
    "revoke": _REVOKE,
    "revocation": _REVOCATION,
    "revocations": _REVOCATIONS,
    **redis_flow.FLOW_SCRIPTS,
    **redis_fenced.FENCED_SCRIPTS,
}


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds, at least 1 (Redis refuses a zero expiry)."""
    return max(1, math.ceil(seconds * 1000))


def _decode(raw: bytes | None) -> tuple[bytes, bool] | None:
    if raw is None:
        return None
    return raw[1:], raw[:1] == _FINAL


class RedisBackend(Backend):
    """Results and coordination state on Redis; thread-safe (one connection pool).

    Args:
        url: ``redis://[:password@]host:port/db`` or ``rediss://...`` (TLS), or
            ``redis+sentinel://[:password@]s1:26379,s2:26379/<service>/<db>``.
        key_prefix: Put in front of every key (and result channel).
        tls: For ``rediss://``: the CA, client certificate, and whether to
            verify (the default: certificate and host name checked).
        socket_timeout: Seconds a command may take (None: no limit). A longer
            :meth:`wait_result` blocks in several commands, each shorter.
        connect_timeout: Seconds to wait for a connection.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "mqtasks:",
        tls: TLSOptions | None = None,
        socket_timeout: float | None = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(url, key_prefix=key_prefix, tls=tls)
        try:
            db = database(url)
        except ConfigurationError as exc:
            raise ConfigurationError(redact(f"Bad result backend URL: {exc}")) from None
        self._channels = f"{key_prefix}db{db}:result:"
        #: The pub/sub channel revocations are announced on.
        self.revocation_channel = f"{key_prefix}db{db}:revoked"
        # A blocking command must return before the socket times out.
        self._max_block = (
            None if socket_timeout is None else max(socket_timeout / 2, socket_timeout - 1.0)
        )
        options = self._tls = tls if tls is not None else TLSOptions()
        #: Whether the URL connects with TLS (``rediss://``).
        self.uses_tls = options.apply(url)
        self._pool_kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "socket_keepalive": True,
            # No silent retry: an INCR whose reply was lost must not count twice.
            "retry": Retry(NoBackoff(), 0),
        }
        self._lock = threading.Lock()
        self._state: tuple[redis.Redis[bytes], dict[str, Script]] | None = None

    # -- keys ------------------------------------------------------------------------

    def result_key(self, task_id: str) -> str:
        """The key of ``task_id``'s result."""
        return f"{self.key_prefix}result:{task_id}"

    def done_key(self, task_id: str) -> str:
        """The list holding ``task_id``'s final record once there is one (what waiters block on)."""
        return f"{self.key_prefix}done:{task_id}"

    def result_channel(self, task_id: str) -> str:
        """The pub/sub channel a final result of ``task_id`` is announced on (for observers)."""
        return f"{self._channels}{task_id}"

    def key(self, key: str) -> str:
        """The Redis key of a coordination ``key`` (a value, counter or set)."""
        return f"{self.key_prefix}key:{key}"

    def lease_key(self, name: str) -> str:
        """The hash of the lease ``name``."""
        return f"{self.key_prefix}lease:{name}"

    @property
    def revocation_keys(self) -> list[str]:
        """The sorted sets of the revoked task ids, and of those to stop where running."""
        return [f"{self.key_prefix}revoked", f"{self.key_prefix}revoked:terminate"]

    @property
    def token_key(self) -> str:
        """The counter lease tokens are drawn from."""
        return f"{self.key_prefix}lease-tokens"

    # -- connections -----------------------------------------------------------------

    def client(self) -> redis.Redis[bytes]:
        """The shared, thread-safe client (its pool is made on first use)."""
        return self._connected()[0]

    def _script(self, name: str) -> Script:
        return self._connected()[1][name]

    def _connected(self) -> tuple[redis.Redis[bytes], dict[str, Script]]:
        """The client and its scripts, made together (one read: a close cannot split them)."""
        state = self._state
        if state is None:
            with self._lock:
                if self._state is None:
                    try:
                        pool = connection_pool(self.url, tls=self._tls, **self._pool_kwargs)
                    except ValueError as exc:
                        raise BackendError(
                            redact(f"Bad result backend URL {mask_url(self.url)}: {exc}")
                        ) from exc
                    client = redis.Redis(connection_pool=pool)
                    scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
                    self._state = (client, scripts)
                state = self._state
        return state

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn redis-py (and socket) errors into :class:`BackendError`, the URL masked."""
        try:
            yield
        except BackendError:
            raise
        except (redis.RedisError, OSError) as exc:
            refused = tls_failure(exc)
            if refused is not None:
                message = (
                    f"{what}: the TLS certificate of the result backend at {mask_url(self.url)} "
                    f"was refused ({refused}). Trust the CA that signed it with "
                    "TLSOptions(ca_file=...) (MQTASKS_TLS_CA_FILE) and connect by a host name "
                    "the certificate lists."
                )
            else:
                message = (
                    f"{what}: the result backend at {mask_url(self.url)} failed "
                    f"({type(exc).__name__}: {exc})"
                )
            raise BackendError(redact(message)) from exc

    def check(self) -> None:
        """PING Redis.

        Raises:
            BackendError: Redis cannot be reached or refused.
        """
        with self._errors("check"):
            self.client().ping()

    def close(self) -> None:
        """Disconnect the pool; a later call connects again."""
        with self._lock:
            state, self._state = self._state, None
        if state is not None:
            state[0].connection_pool.disconnect()
            state[0].close()

    # -- results ------------------------------------------------------------------------

    def _store_call(self, task_id: str, record: bytes, final: bool, expires: float) -> list[Any]:
        """The store script's keys then arguments, for one result."""
        flagged = (_FINAL if final else _NOT_FINAL) + bytes(record)
        return [
            self.result_key(task_id),
            self.done_key(task_id),
            flagged,
            _ms(expires),
            self.result_channel(task_id),
        ]

    def store_result(self, task_id: str, record: bytes, *, final: bool, expires: float) -> bool:
        """Write ``record`` unless a final one is stored (one script); a final write wakes waiters."""
        return self.store_results([ResultWrite(task_id, record, final, expires)])[0]

    def store_results(self, items: Sequence[ResultWrite]) -> list[bool]:
        """Run the store script for each of ``items``, all in one round trip.

        The script is called by its digest; if Redis does not know it (after a
        restart or ``SCRIPT FLUSH``), it is loaded and the calls it refused
        run again (a refused call did not run).
        """
        if not items:
            return []
        calls = [self._store_call(*item) for item in items]
        what = (
            f"store the result of {items[0].task_id}"
            if len(items) == 1
            else f"store {len(items)} results"
        )
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        with self._errors(what):
            for attempt in range(2):
                for i, reply in zip(todo, self._evalsha([calls[i] for i in todo]), strict=True):
                    replies[i] = reply
                todo = [i for i in todo if isinstance(replies[i], redis.exceptions.NoScriptError)]
                if not todo:
                    break
                if attempt == 0:
                    client: Any = self.client()
                    client.script_load(_STORE_RESULT)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return [bool(reply) for reply in replies]

    def _evalsha(self, calls: list[list[Any]]) -> list[Any]:
        """Send an ``EVALSHA`` of the store script per call on one pooled connection; the replies.

        Straight on the connection, without the client's per-command path
        (its retry wrapper, pipeline bookkeeping and metrics), which costs
        more CPU than the round trip itself; the replies are all read, so the
        connection goes back to the pool clean, or is dropped on any error.
        """
        pool = self.client().connection_pool
        conn = pool.get_connection()
        try:
            commands = [("EVALSHA", _STORE_SHA, 2, *call) for call in calls]
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return replies

    def get_result(self, task_id: str) -> tuple[bytes, bool] | None:
        """GET the result of ``task_id``."""
        with self._errors(f"read the result of {task_id}"):
            return _decode(self.client().get(self.result_key(task_id)))

    def get_results(self, task_ids: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        """MGET the results of ``task_ids``, in order (one round trip)."""
        if not task_ids:
            return []
        with self._errors(f"read {len(task_ids)} results"):
            raw = self.client().mget([self.result_key(t) for t in task_ids])
        return [_decode(r) for r in raw]

    def wait_result(self, task_id: str, timeout: float) -> bytes | None:
        """``BLMOVE`` the task's done list onto itself: one blocking command.

        Moving the list's one element from its right end to its left end
        returns it and leaves the list as it was, so every waiter blocked on
        it wakes when the final record is stored, and a wait after that
        returns at once. A wait longer than the socket's timeout blocks in
        several commands; a zero timeout reads the list without blocking.
        """
        key = self.done_key(task_id)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._errors(f"wait for the result of {task_id}"):
            client = self.client()
            remaining = timeout
            if remaining <= 0:
                stored = client.lindex(key, 0)
                return None if stored is None else bytes(stored)
            while remaining > 0:
                block = remaining if self._max_block is None else min(remaining, self._max_block)
                # Whole milliseconds, at least one: Redis reads a zero timeout as forever.
                found = cast(
                    "bytes | None", client.blmove(key, key, _ms(block) / 1000, "RIGHT", "LEFT")
                )
                if found is not None:
                    return bytes(found)
                remaining = deadline - time.monotonic()
            return None

    def forget(self, task_id: str) -> None:
        """DEL the result of ``task_id`` and its done list."""
        with self._errors(f"forget the result of {task_id}"):
            self.client().delete(self.result_key(task_id), self.done_key(task_id))

    # -- coordination ----------------------------------------------------------------------

    def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """SET NX PX."""
        with self._errors(f"set {key!r}"):
            return bool(self.client().set(self.key(key), value, nx=True, px=_ms(ttl)))

    def get(self, key: str) -> bytes | None:
        """GET."""
        with self._errors(f"read {key!r}"):
            return self.client().get(self.key(key))

    def put(self, key: str, value: bytes, ttl: float) -> None:
        """SET PX."""
        with self._errors(f"write {key!r}"):
            self.client().set(self.key(key), value, px=_ms(ttl))

    def delete(self, key: str) -> None:
        """DEL."""
        with self._errors(f"delete {key!r}"):
            self.client().delete(self.key(key))

    def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """INCRBY, and PEXPIRE when the counter has no expiry yet (one script)."""
        with self._errors(f"increment {key!r}"):
            return int(self._script("incr")(keys=[self.key(key)], args=[amount, _ms(ttl)]))

    def add_member(self, key: str, member: str, *, ttl: float) -> tuple[bool, int]:
        """SADD, SCARD, and PEXPIRE when the set has no expiry yet (one script)."""
        with self._errors(f"add to {key!r}"):
            added, size = self._script("add_member")(keys=[self.key(key)], args=[member, _ms(ttl)])
        return bool(added), int(size)

    def members(self, key: str) -> set[str]:
        """SMEMBERS."""
        with self._errors(f"read the members of {key!r}"):
            raw = self.client().smembers(self.key(key))
        return {m.decode() for m in raw}

    # -- leases -------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Take or renew ``name`` (one script); a new holder INCRs the token counter."""
        with self._errors(f"acquire the lease {name!r}"):
            token = self._script("acquire")(
                keys=[self.lease_key(name), self.token_key], args=[owner, _ms(ttl)]
            )
        return None if token is None else int(token)

    def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """PEXPIRE the lease if ``owner`` holds it (one script)."""
        with self._errors(f"renew the lease {name!r}"):
            return bool(self._script("renew")(keys=[self.lease_key(name)], args=[owner, _ms(ttl)]))

    def release_lease(self, name: str, owner: str) -> None:
        """DEL the lease if ``owner`` holds it (one script)."""
        with self._errors(f"release the lease {name!r}"):
            self._script("release")(keys=[self.lease_key(name)], args=[owner])

    def lease_holder(self, name: str) -> tuple[str, int] | None:
        """HMGET owner, token (the hash expires with the lease)."""
        with self._errors(f"read the lease {name!r}"):
            owner, token = self.client().hmget(self.lease_key(name), ["owner", "token"])
        if owner is None or token is None:
            return None
        return owner.decode(), int(token)

    claim_fenced = redis_fenced.claim_fenced
    put_fenced = redis_fenced.put_fenced

    # -- flow control (mqtasks.backend.redis_flow) ----------------------------------------------

    take_token = redis_flow.take_token
    peek_tokens = redis_flow.peek_tokens
    acquire_slot = redis_flow.acquire_slot
    renew_slots = redis_flow.renew_slots
    release_slot = redis_flow.release_slot
    slots_held = redis_flow.slots_held

    # -- revocations --------------------------------------------------------------------------

    def add_revocation(self, task_id: str, *, terminate: bool, ttl: float) -> None:
        """ZADD to the revoked set(s) and PUBLISH the notice (one script)."""
        notice = encode_notice(task_id, terminate=terminate, ttl=ttl)
        args = [task_id, _ms(ttl), "1" if terminate else "0", self.revocation_channel, notice]
        with self._errors(f"revoke {task_id}"):
            self._script("revoke")(keys=self.revocation_keys, args=args)

    def remove_revocation(self, task_id: str) -> None:
        """ZREM from both sets and PUBLISH the removal (one transaction)."""
        with self._errors(f"remove the revocation of {task_id}"):
            pipe = self.client().pipeline(transaction=True)
            for key in self.revocation_keys:
                pipe.zrem(key, task_id)
            pipe.publish(self.revocation_channel, encode_notice(task_id))
            pipe.execute()

    def revocation(self, task_id: str) -> Revocation | None:
        """ZSCORE in both sets, with the server's time (one script)."""
        with self._errors(f"read the revocation of {task_id}"):
            found = self._script("revocation")(keys=self.revocation_keys, args=[task_id])
        if not found:
            return None
        now, expires, terminate = found
        return Revocation(task_id, bool(terminate), (float(expires) - float(now)) / 1000)

    def revocations(self) -> list[Revocation]:
        """Drop the expired members and read the rest (one script), with the server's time."""
        with self._errors("read the revocations"):
            now, scored, terminating = self._script("revocations")(keys=self.revocation_keys)
        stop = {bytes(m).decode() for m in terminating}
        found = []
        for i in range(0, len(scored), 2):
            task_id = bytes(scored[i]).decode()
            found.append(Revocation(task_id, task_id in stop, (float(scored[i + 1]) - now) / 1000))
        return found

    def watch_revocations(self, listener: RevocationListener) -> Watch:
        """SUBSCRIBE to the revocation channel in a thread of its own (a connection of its own)."""
        listen = listen_pubsub(self.client, self.revocation_channel)
        return WatchThread(f"mqtasks-revocations-{self.key_prefix}", listen, listener)
