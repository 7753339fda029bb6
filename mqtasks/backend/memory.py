"""``memory://``: the state backend in this process's memory, for tests and one-process apps.

Dicts guarded by one ``threading.Condition``, which :meth:`MemoryBackend.wait_result`
also waits on. Expiry is measured on the monotonic clock; expired entries read
as absent and are dropped when touched or swept. Nothing crosses a process: a
worker in another process (``--processes``, a second ``mqtasks worker``) sees
none of it, and each :class:`MemoryBackend` (each ``resolve("memory://")``) is
a store of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..exceptions import BackendError
from .base import (
    Backend,
    BucketState,
    Revocation,
    RevocationListener,
    TokenGrant,
    Watch,
    token_bucket_step,
)

if TYPE_CHECKING:
    from ..transport.tls import TLSOptions

__all__ = ["MemoryBackend"]

#: Writes between two sweeps of expired entries.
_SWEEP_EVERY = 1000


@dataclass
class _Result:
    record: bytes
    final: bool
    expires_at: float


@dataclass
class _Entry:
    """A value, a counter or a set under one key (a key holds one of them)."""

    value: bytes | int | set[str]
    expires_at: float


@dataclass
class _Lease:
    owner: str
    token: int
    expires_at: float


def _claim(key: str, value: bytes | int | set[str]) -> int:
    """The token of the claim ``value`` under ``key`` (decimal ASCII, or a counter)."""
    if not isinstance(value, set):
        with contextlib.suppress(ValueError):
            return int(value)
    raise BackendError(f"claim {key!r}: the key holds no claim")


class MemoryBackend(Backend):
    """Results and coordination state in this process's memory (one process only).

    Every operation holds one lock, so each is atomic across the threads of the
    process; :meth:`wait_result` sleeps on the lock's condition until a final
    record is stored.
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(
        self, url: str = "memory://", *, key_prefix: str = "mqtasks:", tls: TLSOptions | None = None
    ) -> None:
        super().__init__(url, key_prefix=key_prefix, tls=tls)
        self._cond = threading.Condition()
        self._results: dict[str, _Result] = {}
        self._entries: dict[str, _Entry] = {}
        self._leases: dict[str, _Lease] = {}
        self._tokens = itertools.count(1)
        self._writes = 0
        #: Revoked task id -> (terminate, expires_at).
        self._revoked: dict[str, tuple[bool, float]] = {}
        self._watchers: list[RevocationListener] = []
        #: Token buckets: key -> (state, expires_at).
        self._buckets: dict[str, tuple[BucketState, float]] = {}
        #: Slots: key -> {owner: expires_at}.
        self._slots: dict[str, dict[str, float]] = {}

    # -- helpers (called with the lock held) ---------------------------------------

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            for table in (self._results, self._entries, self._leases):
                for key in [k for k, v in table.items() if v.expires_at <= now]:
                    del table[key]
            for key in [k for k, (_, at) in self._buckets.items() if at <= now]:
                del self._buckets[key]
            for key in [
                k for k, slots in self._slots.items() if max(slots.values(), default=0) <= now
            ]:
                del self._slots[key]

    def _result(self, task_id: str, now: float) -> _Result | None:
        result = self._results.get(task_id)
        if result is not None and result.expires_at <= now:
            del self._results[task_id]
            return None
        return result

    def _entry(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    def _lease(self, name: str, now: float) -> _Lease | None:
        lease = self._leases.get(name)
        if lease is not None and lease.expires_at <= now:
            del self._leases[name]
            return None
        return lease

    # -- results ---------------------------------------------------------------------

    def store_result(self, task_id: str, record: bytes, *, final: bool, expires: float) -> bool:
        """Store ``record`` unless a final record exists; a final one wakes the waiters."""
        with self._cond:
            now = time.monotonic()
            current = self._result(task_id, now)
            if current is not None and current.final:
                return False
            self._results[task_id] = _Result(bytes(record), final, now + expires)
            self._wrote(now)
            if final:
                self._cond.notify_all()
            return True

    def get_result(self, task_id: str) -> tuple[bytes, bool] | None:
        """Return ``(record, final)`` stored for ``task_id``, or None."""
        with self._cond:
            result = self._result(task_id, time.monotonic())
            return None if result is None else (result.record, result.final)

    def get_results(self, task_ids: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        """Return what :meth:`get_result` returns for each id, in order, under one lock."""
        with self._cond:
            now = time.monotonic()
            found = [self._result(task_id, now) for task_id in task_ids]
        return [None if r is None else (r.record, r.final) for r in found]

    def wait_result(self, task_id: str, timeout: float) -> bytes | None:
        """Wait on the condition until a final record of ``task_id`` is stored, or ``timeout`` s."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                now = time.monotonic()
                result = self._result(task_id, now)
                if result is not None and result.final:
                    return result.record
                if now >= deadline:
                    return None
                self._cond.wait(deadline - now)

    def forget(self, task_id: str) -> None:
        """Delete whatever is stored for ``task_id``."""
        with self._cond:
            self._results.pop(task_id, None)

    # -- coordination -------------------------------------------------------------------

    def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` for ``ttl`` s unless ``key`` holds something live."""
        with self._cond:
            now = time.monotonic()
            if self._entry(key, now) is not None:
                return False
            self._entries[key] = _Entry(bytes(value), now + ttl)
            self._wrote(now)
            return True

    def get(self, key: str) -> bytes | None:
        """Return the value (or a counter in decimal ASCII) under ``key``, or None."""
        with self._cond:
            entry = self._entry(key, time.monotonic())
        if entry is None or isinstance(entry.value, set):
            return None
        if isinstance(entry.value, int):
            return str(entry.value).encode()
        return entry.value

    def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` s."""
        with self._cond:
            now = time.monotonic()
            self._entries[key] = _Entry(bytes(value), now + ttl)
            self._wrote(now)

    def delete(self, key: str) -> None:
        """Delete ``key``, whatever it holds."""
        with self._cond:
            self._entries.pop(key, None)

    def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """Add ``amount`` to the counter ``key``; it expires ``ttl`` s after its creation."""
        with self._cond:
            now = time.monotonic()
            entry = self._entry(key, now)
            if entry is None or not isinstance(entry.value, int):
                entry = self._entries[key] = _Entry(0, now + ttl)
            assert isinstance(entry.value, int)
            entry.value += amount
            self._wrote(now)
            return entry.value

    def add_member(self, key: str, member: str, *, ttl: float) -> tuple[bool, int]:
        """Add ``member`` to the set ``key``; return ``(added, size)`` read under the same lock."""
        with self._cond:
            now = time.monotonic()
            entry = self._entry(key, now)
            if entry is None or not isinstance(entry.value, set):
                entry = self._entries[key] = _Entry(set(), now + ttl)
            assert isinstance(entry.value, set)
            added = member not in entry.value
            entry.value.add(member)
            self._wrote(now)
            return added, len(entry.value)

    def members(self, key: str) -> set[str]:
        """Return a copy of the set ``key`` (empty if absent)."""
        with self._cond:
            entry = self._entry(key, time.monotonic())
            return set(entry.value) if entry is not None and isinstance(entry.value, set) else set()

    # -- leases ---------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Take or renew the lease ``name``; a new holder gets the next token."""
        with self._cond:
            now = time.monotonic()
            lease = self._lease(name, now)
            if lease is not None:
                if lease.owner != owner:
                    return None
                lease.expires_at = now + ttl
                return lease.token
            lease = self._leases[name] = _Lease(owner, next(self._tokens), now + ttl)
            self._wrote(now)
            return lease.token

    def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s live hold on ``name``; False if it does not hold it."""
        with self._cond:
            now = time.monotonic()
            lease = self._lease(name, now)
            if lease is None or lease.owner != owner:
                return False
            lease.expires_at = now + ttl
            return True

    def release_lease(self, name: str, owner: str) -> None:
        """Free ``name`` if ``owner`` holds it."""
        with self._cond:
            lease = self._lease(name, time.monotonic())
            if lease is not None and lease.owner == owner:
                del self._leases[name]

    def lease_holder(self, name: str) -> tuple[str, int] | None:
        """Return ``(owner, token)`` of the live holder of ``name``, or None."""
        with self._cond:
            lease = self._lease(name, time.monotonic())
            return None if lease is None else (lease.owner, lease.token)

    def _fenced(self, lease: str, token: int, now: float) -> bool:
        """Whether ``lease`` is live with ``token`` (called with the lock held)."""
        found = self._lease(lease, now)
        return found is not None and found.token == token

    def claim_fenced(
        self, lease: str, token: int, keys: Sequence[str], ttl: float
    ) -> list[int] | None:
        """Under the lock: check the lease's token, then set each absent key to it."""
        with self._cond:
            now = time.monotonic()
            if not self._fenced(lease, token, now):
                return None
            holders: list[int] = []
            for key in keys:
                entry = self._entry(key, now)
                if entry is None:
                    entry = self._entries[key] = _Entry(str(token).encode(), now + ttl)
                    self._wrote(now)
                holders.append(_claim(key, entry.value))
            return holders

    def put_fenced(self, lease: str, token: int, key: str, value: bytes, ttl: float) -> bool:
        """Under the lock: check the lease's token, then :meth:`put`."""
        with self._cond:
            now = time.monotonic()
            if not self._fenced(lease, token, now):
                return False
            self._entries[key] = _Entry(bytes(value), now + ttl)
            self._wrote(now)
            return True

    # -- flow control -------------------------------------------------------------------------

    def _bucket(self, key: str, now: float) -> BucketState | None:
        found = self._buckets.get(key)
        if found is not None and found[1] <= now:
            del self._buckets[key]
            return None
        return None if found is None else found[0]

    def take_token(
        self, key: str, *, rate: float, capacity: float, max_wait: float, count: int = 1
    ) -> TokenGrant:
        """One step of the bucket ``key`` under the lock (see :func:`~mqtasks.backend.base.token_bucket_step`)."""
        with self._cond:
            now = time.monotonic()
            grant, state, keep = token_bucket_step(
                self._bucket(key, now),
                now,
                rate=rate,
                capacity=capacity,
                max_wait=max_wait,
                count=count,
            )
            self._buckets[key] = (state, now + keep)
            self._wrote(now)
            return grant

    def peek_tokens(self, key: str, *, rate: float, capacity: float) -> float:
        """Return the tokens of ``key`` now (``capacity`` if absent)."""
        with self._cond:
            now = time.monotonic()
            state = self._bucket(key, now)
        if state is None:
            return capacity
        return min(capacity, state.tokens + max(0.0, now - state.ts) * rate)

    def _live_slots(self, key: str, now: float) -> dict[str, float]:
        slots = self._slots.setdefault(key, {})
        for owner in [o for o, at in slots.items() if at <= now]:
            del slots[owner]
        return slots

    def acquire_slot(self, key: str, owner: str, *, limit: int, ttl: float) -> tuple[bool, int]:
        """Take (or renew) ``owner``'s slot of ``key`` unless ``limit`` are held, under the lock."""
        with self._cond:
            now = time.monotonic()
            slots = self._live_slots(key, now)
            if owner not in slots and len(slots) >= limit:
                return False, len(slots)
            slots[owner] = now + ttl
            self._wrote(now)
            return True, len(slots)

    def renew_slots(self, key: str, owners: Sequence[str], ttl: float) -> int:
        """Extend the live slots of ``owners``; return how many were."""
        with self._cond:
            now = time.monotonic()
            slots = self._live_slots(key, now)
            renewed = [o for o in owners if o in slots]
            for owner in renewed:
                slots[owner] = now + ttl
            return len(renewed)

    def release_slot(self, key: str, owner: str) -> None:
        """Free ``owner``'s slot of ``key``."""
        with self._cond:
            slots = self._slots.get(key)
            if slots is not None:
                slots.pop(owner, None)
                if not slots:
                    del self._slots[key]

    def slots_held(self, key: str) -> int:
        """Return the live slots of ``key``."""
        with self._cond:
            if key not in self._slots:
                return 0
            return len(self._live_slots(key, time.monotonic()))

    # -- revocations ------------------------------------------------------------------------

    def add_revocation(self, task_id: str, *, terminate: bool, ttl: float) -> None:
        """Keep ``task_id`` revoked; tell the watchers in this thread, once stored."""
        with self._cond:
            now = time.monotonic()
            self._revoked[task_id] = (terminate, now + ttl)
            for key in [k for k, (_, at) in self._revoked.items() if at <= now]:
                del self._revoked[key]
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.on_revocation(Revocation(task_id, terminate, ttl))

    def remove_revocation(self, task_id: str) -> None:
        """Forget the revocation of ``task_id``; tell the watchers in this thread."""
        with self._cond:
            self._revoked.pop(task_id, None)
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.on_revocation_removed(task_id)

    def revocation(self, task_id: str) -> Revocation | None:
        """Return the live revocation of ``task_id``, or None."""
        with self._cond:
            found = self._revoked.get(task_id)
            left = 0.0 if found is None else found[1] - time.monotonic()
        return None if found is None or left <= 0 else Revocation(task_id, found[0], left)

    def revocations(self) -> list[Revocation]:
        """Return the live revocations."""
        with self._cond:
            now = time.monotonic()
            return [
                Revocation(task_id, terminate, at - now)
                for task_id, (terminate, at) in self._revoked.items()
                if at > now
            ]

    def watch_revocations(self, listener: RevocationListener) -> Watch:
        """Call ``listener`` from each revoking thread until the watch is closed."""
        with self._cond:
            self._watchers.append(listener)
        listener.on_watch_connected()
        return _MemoryWatch(self, listener)

    def _unwatch(self, listener: RevocationListener) -> None:
        with self._cond:
            if listener in self._watchers:
                self._watchers.remove(listener)

    def close(self) -> None:
        """Nothing to close; the state stays (it is the store)."""


class _MemoryWatch:
    """A :meth:`MemoryBackend.watch_revocations`: closing it unregisters its listener."""

    def __init__(self, backend: MemoryBackend, listener: RevocationListener) -> None:
        self._backend = backend
        self._listener = listener

    def close(self) -> None:
        """Stop telling the listener."""
        self._backend._unwatch(self._listener)
