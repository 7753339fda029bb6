"""Backend: the interface every state store implements (results and coordination state).

A backend stores bytes under keys; it never knows tasks, messages or the app
(the layers above encode results as JSON before they reach it). Besides
results, it offers the few atomic operations the features above need: a
set-if-absent with expiry, counters, a set whose size is returned by the
same operation that adds to it, leases with fencing tokens, writes fenced by a lease
(:meth:`Backend.claim_fenced`, :meth:`Backend.put_fenced`), and the two
flow-control operations: a token bucket (:meth:`Backend.take_token`) and
lease-based slots (:meth:`Backend.acquire_slot`).

Every implementation passes the same behaviour tests (``tests/backend``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

from .._url import mask_url, remember_secret

if TYPE_CHECKING:
    from ..transport.tls import TLSOptions

__all__ = [
    "Backend",
    "BucketState",
    "ResultWrite",
    "Revocation",
    "RevocationListener",
    "TokenGrant",
    "Watch",
    "token_bucket_step",
]


class ResultWrite(NamedTuple):
    """One result to store: the arguments of :meth:`Backend.store_result`, for :meth:`Backend.store_results`."""

    #: The task (message) id.
    task_id: str
    #: The encoded outcome.
    record: bytes
    #: Whether this is the task's last outcome.
    final: bool
    #: Seconds from now after which the record is gone.
    expires: float


class Revocation(NamedTuple):
    """A revoked task id, as a backend lists it (:meth:`Backend.revocations`) and announces it."""

    #: The task (message) id.
    task_id: str
    #: Whether a worker running the task is to stop it.
    terminate: bool
    #: Seconds from now (when read) the revocation is kept.
    expires: float


class TokenGrant(NamedTuple):
    """What :meth:`Backend.take_token` answered."""

    #: Whether a token is the caller's: due now (``wait`` 0) or in ``wait`` seconds.
    granted: bool
    #: Granted: seconds until the caller's token is due (it sleeps that long, then
    #: runs). Refused: seconds after which the caller is to come back.
    wait: float
    #: Tokens in the bucket after the operation (below zero: reserved ahead).
    tokens: float
    #: Tokens taken: 0 when refused; more than 1 only when ``count`` asked for more.
    taken: int = 1


class BucketState(NamedTuple):
    """A token bucket as stored: its tokens at ``ts``, and the deferral schedule ``queued``."""

    #: Tokens at ``ts`` (below zero: tokens reserved ahead by callers that sleep).
    tokens: float
    #: When ``tokens`` was counted, in seconds on the store's clock.
    ts: float
    #: When the last refused caller was told to come back, on the same clock (0: none).
    queued: float


def token_bucket_step(
    state: BucketState | None,
    now: float,
    *,
    rate: float,
    capacity: float,
    max_wait: float,
    count: int = 1,
) -> tuple[TokenGrant, BucketState, float]:
    """One :meth:`Backend.take_token` on ``state`` (None: absent, a full bucket) at ``now``.

    The reference the stores implement (memory and PostgreSQL call it; Redis
    runs the same steps in Lua). The bucket refills at ``rate`` tokens per
    second up to ``capacity``. A caller takes a whole token if there is one;
    else, if the next token is due within ``max_wait`` s, it reserves it (the
    count goes below zero, so the next caller's token is due one interval
    later) and is told to wait for it; else it is refused and told to come
    back at the next free place of a schedule spaced one interval
    (``1 / rate``) apart, after the reserved tokens, so that refused callers
    come back one by one instead of all at once.

    A caller asking ``count`` tokens gets more than one only from the upper
    half of the bucket (where the rate is far from reached), as many as are
    whole there, up to ``count``; below it, one.

    Returns:
        The grant, the new state, and the seconds the state must be kept
        (after which it equals a full bucket).
    """
    interval = 1.0 / rate
    if state is None:
        tokens, queued = capacity, 0.0
    else:
        tokens = min(capacity, state.tokens + max(0.0, now - state.ts) * rate)
        queued = state.queued
    if tokens >= 1:
        taken = max(1, min(count, math.floor(tokens - capacity / 2)))
        tokens -= taken
        grant = TokenGrant(True, 0.0, tokens, taken)
    else:
        wait = (1 - tokens) * interval
        if wait <= max_wait:
            tokens -= 1
            grant = TokenGrant(True, wait, tokens)
        else:
            queued = max(now + wait, queued + interval)
            grant = TokenGrant(False, queued - now, tokens, 0)
    keep = max((capacity - tokens) * interval, queued - now) + 1.0
    return grant, BucketState(tokens, now, queued), keep


class RevocationListener(Protocol):
    """What :meth:`Backend.watch_revocations` tells of revocations, from the watch's thread."""

    def on_revocation(self, revocation: Revocation) -> None:
        """A revocation was added (or renewed) in the store."""

    def on_revocation_removed(self, task_id: str) -> None:
        """The revocation of ``task_id`` was removed."""

    def on_watch_connected(self) -> None:
        """The watch is listening (again): what was announced before may have been
        missed, so read :meth:`Backend.revocations` now."""


class Watch(Protocol):
    """A running :meth:`Backend.watch_revocations`."""

    def close(self) -> None:
        """Stop listening; no callback runs once this returns."""


class Backend(abc.ABC):
    """Results and coordination state, chosen by URL (:func:`mqtasks.backend.resolve`).

    Keys are strings the layers above choose (a task id, ``chord:<id>``); each
    implementation puts its own prefix in front of them, so one Redis database
    or PostgreSQL schema can hold several apps' state. Times are seconds
    (``float``); an expiry is relative to now.

    Thread-safe: one instance is shared by every worker thread of a process.
    Not fork-safe: a forked child makes its own (connections never cross a fork).
    """

    #: URL schemes this class serves (``redis``, ``rediss``, ``postgresql``, ``memory``).
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, url: str, *, key_prefix: str = "mqtasks:", tls: TLSOptions | None = None
    ) -> None:
        """Remember the store's ``url`` (its password is masked in every text) and options.

        Args:
            url: The backend URL.
            key_prefix: Put in front of every key, so that apps can share one store.
            tls: TLS settings, for the stores reached over a network.
        """
        remember_secret(url)
        #: The backend URL; print it only through ``mask_url`` (its password masked).
        self.url = url
        #: Put in front of every key and task id this backend stores.
        self.key_prefix = key_prefix
        #: TLS settings (None: the defaults of a TLS URL, verified).
        self.tls = tls

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)}>"

    # -- results ------------------------------------------------------------------

    @abc.abstractmethod
    def store_result(self, task_id: str, record: bytes, *, final: bool, expires: float) -> bool:
        """Store the outcome ``record`` of task ``task_id``; return whether it was written.

        A final record (a task's last outcome) is written only if no final
        record exists yet: the first final outcome wins, so a reader never
        sees a result change when a redelivered task runs twice. Writing a
        final record wakes every :meth:`wait_result` waiting for it. A
        non-final record (started, retrying) replaces an earlier non-final
        one and is never written over a final one.

        Args:
            task_id: The task (message) id.
            record: The encoded outcome.
            final: Whether this is the task's last outcome.
            expires: Seconds from now after which the record is gone.
        """

    def store_results(self, items: Sequence[ResultWrite]) -> list[bool]:
        """Store several results; return, for each in order, whether it was written.

        Each item is stored as :meth:`store_result` stores it (the first
        final record wins). Implementations write them in one round trip
        where the store allows: a worker stores the outcomes of tasks that
        end together at once.

        Raises:
            BackendError: Not every item could be stored (some may have been:
                storing one again is harmless, the first final record stays).
        """
        return [
            self.store_result(item.task_id, item.record, final=item.final, expires=item.expires)
            for item in items
        ]

    @abc.abstractmethod
    def get_result(self, task_id: str) -> tuple[bytes, bool] | None:
        """Return ``(record, final)`` stored for ``task_id``, or None if there is none."""

    def get_results(self, task_ids: Sequence[str]) -> list[tuple[bytes, bool] | None]:
        """Return what :meth:`get_result` returns for each of ``task_ids``, in order.

        Implementations fetch them in one round trip where the store allows.
        """
        return [self.get_result(task_id) for task_id in task_ids]

    @abc.abstractmethod
    def wait_result(self, task_id: str, timeout: float) -> bytes | None:
        """Return the final record of ``task_id`` once there is one; None after ``timeout`` s.

        Waits on the store's notification (a blocking Redis command,
        PostgreSQL LISTEN/NOTIFY), never by polling in a loop; returns at once
        if the final record is already stored.
        """

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Delete whatever is stored for ``task_id``."""

    # -- coordination ---------------------------------------------------------------

    @abc.abstractmethod
    def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` s unless the key exists; return whether stored."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """Return the value under ``key`` (from :meth:`set_if_absent` or :meth:`put`), or None.

        A counter (:meth:`incr`) reads as its value in decimal ASCII (``b"3"``).
        """

    @abc.abstractmethod
    def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` s, replacing what was there."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key`` (a value, a counter or a set); nothing happens if it is absent."""

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """Add ``amount`` to the counter ``key`` (0 if absent) atomically; return the new value.

        The counter expires ``ttl`` s after it was created.
        """

    @abc.abstractmethod
    def add_member(self, key: str, member: str, *, ttl: float) -> tuple[bool, int]:
        """Add ``member`` to the set ``key`` atomically; return ``(added, size)``.

        ``added`` is False when ``member`` was in the set already; ``size`` is
        the set's size after the operation, read in the same atomic step, so
        exactly one caller sees each size first. Adding the same member twice
        (a redelivered task) never counts twice. The set expires ``ttl`` s
        after it was created.
        """

    @abc.abstractmethod
    def members(self, key: str) -> set[str]:
        """Return the members of the set ``key`` (empty if absent)."""

    # -- leases ----------------------------------------------------------------------

    @abc.abstractmethod
    def acquire_lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Take the lease ``name`` for ``owner`` for ``ttl`` s; return its fencing token, or None.

        Succeeds if the lease is free, expired, or held by ``owner`` already
        (then it is renewed and keeps its token). Each new holder gets a
        token greater than every earlier holder's, so a store written with
        tokens can refuse a holder that lost its lease without knowing it.
        """

    @abc.abstractmethod
    def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s hold on ``name`` to ``ttl`` s from now; False if it no longer holds it."""

    @abc.abstractmethod
    def release_lease(self, name: str, owner: str) -> None:
        """Give up ``owner``'s hold on ``name``; nothing happens if another holds it."""

    @abc.abstractmethod
    def lease_holder(self, name: str) -> tuple[str, int] | None:
        """Return ``(owner, token)`` of the live holder of ``name``, or None."""

    @abc.abstractmethod
    def claim_fenced(
        self, lease: str, token: int, keys: Sequence[str], ttl: float
    ) -> list[int] | None:
        """While ``lease`` is live with fencing ``token``, claim each of ``keys`` for it, atomically.

        In one atomic operation: if the lease is not held with ``token`` (expired,
        taken by another, never held), nothing is claimed and None is returned;
        a holder that lost its lease without knowing it (a frozen process)
        claims nothing. Otherwise each absent key is set to ``token`` for
        ``ttl`` s (set-if-absent) and a present key is left as it is.

        Returns:
            For each key, in order, the token whose claim it holds after the
            operation (``token`` for a key claimed now or earlier by the same
            holder); None when fenced out.
        """

    @abc.abstractmethod
    def put_fenced(self, lease: str, token: int, key: str, value: bytes, ttl: float) -> bool:
        """:meth:`put` ``value`` under ``key`` for ``ttl`` s only while ``lease`` is live with ``token``.

        Checked and written in one atomic operation; returns whether it was stored.
        """

    # -- flow control: a token bucket and lease-based slots ---------------------------------

    @abc.abstractmethod
    def take_token(
        self, key: str, *, rate: float, capacity: float, max_wait: float, count: int = 1
    ) -> TokenGrant:
        """Take a token (or up to ``count``) from the bucket ``key``, in one atomic operation.

        See :func:`token_bucket_step` for the semantics: a token now, a token
        reserved ``wait`` s ahead (``wait <= max_wait``), or a refusal with the
        time to come back. Times are the store's clock. The bucket is kept
        only while it is not full.

        Args:
            key: The bucket (the layers above choose it: ``flow:rate:<task>``).
            rate: Tokens added per second.
            capacity: Most tokens the bucket holds (the burst), at least 1.
            max_wait: Longest wait for a token the caller accepts, in seconds.
            count: Most tokens to take at once (see :func:`token_bucket_step`).
        """

    @abc.abstractmethod
    def peek_tokens(self, key: str, *, rate: float, capacity: float) -> float:
        """Return the tokens in the bucket ``key`` now (``capacity`` if absent), changing nothing."""

    @abc.abstractmethod
    def acquire_slot(self, key: str, owner: str, *, limit: int, ttl: float) -> tuple[bool, int]:
        """Take one of ``limit`` slots of ``key`` for ``owner`` for ``ttl`` s, atomically.

        A slot is a lease: it frees itself ``ttl`` s after it was taken or last
        renewed (:meth:`renew_slots`), so a holder that died without releasing
        it does not keep it. An owner that holds a slot already renews it.

        Returns:
            ``(acquired, held)``: whether ``owner`` holds a slot now, and the
            live slots held after the operation.
        """

    @abc.abstractmethod
    def renew_slots(self, key: str, owners: Sequence[str], ttl: float) -> int:
        """Extend each live slot of ``owners`` in ``key`` to ``ttl`` s from now; return how many were."""

    @abc.abstractmethod
    def release_slot(self, key: str, owner: str) -> None:
        """Free ``owner``'s slot in ``key``; nothing happens if it holds none."""

    @abc.abstractmethod
    def slots_held(self, key: str) -> int:
        """Return how many live slots of ``key`` are held."""

    # -- revocations -------------------------------------------------------------------

    @abc.abstractmethod
    def add_revocation(self, task_id: str, *, terminate: bool, ttl: float) -> None:
        """Keep ``task_id`` revoked for ``ttl`` s and announce it to every watcher.

        A second revocation of the same id replaces the first (its expiry and
        ``terminate``). Announced within a second on the store's push
        channel (Redis pub/sub, PostgreSQL NOTIFY) to every
        :meth:`watch_revocations`, in any process.
        """

    @abc.abstractmethod
    def remove_revocation(self, task_id: str) -> None:
        """Forget the revocation of ``task_id`` (if any) and announce it to every watcher."""

    @abc.abstractmethod
    def revocation(self, task_id: str) -> Revocation | None:
        """Return the live revocation of ``task_id``, or None (never revoked, removed, expired)."""

    @abc.abstractmethod
    def revocations(self) -> list[Revocation]:
        """Return the live revocations (expired ones are left out), in no order."""

    @abc.abstractmethod
    def watch_revocations(self, listener: RevocationListener) -> Watch:
        """Call ``listener`` for each revocation announced from now on, until closed.

        The listener runs in a thread of the watch (memory: in the revoking
        thread); :meth:`RevocationListener.on_watch_connected` is called each
        time it starts listening, also after a lost connection (then it
        reconnects by itself, with backoff), so the listener reads
        :meth:`revocations` again and misses nothing.
        """

    # -- lifecycle ---------------------------------------------------------------------

    def check(self) -> None:  # noqa: B027 - a store that needs no round trip has nothing to check
        """Make one round trip to the store.

        Raises:
            BackendError: The store cannot be reached or refused the request.
        """

    def migrate(self) -> list[str]:
        """Create the tables (or whatever else) the store needs; return what was done.

        Stores that need nothing (Redis, memory) return an empty list. Those
        that do also create what they need on first use; this is for deploy
        scripts (``mqtasks backend migrate``) that would rather do it ahead.

        Raises:
            BackendError: The store cannot be reached or refused the request.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional: stores without connections need nothing
        """Close the backend's connections; a later call reconnects."""
