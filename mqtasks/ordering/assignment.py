"""Partition ownership: which worker consumes which partitions of a queue, through backend leases.

Each worker serving a queue with ordered tasks joins the queue's members
(``ordering:members:<queue>``, alive while its key ``ordering:member:<queue>:<id>``
is refreshed), takes its fair share ``ceil(partitions / live members)`` and
holds one lease per partition it owns (``ordering:part:<queue>:<i>``,
renewed every third of the lease time). Owning too many, it asks the I/O
thread to give the extras up gracefully and releases their leases once told
they are drained; owning too few, it takes free ones, those with
``i % members == its rank`` first. A lease it fails to renew is lost: the
I/O thread stops consuming that partition at once (``ordering.lease_lost``).

A worker joins first and takes partitions only after a short settle window
(``SETTLE``), so that workers started together (the processes of one
``mqtasks worker -p N``) each take their fair share from the start instead of
the first taking everything and handing half back. Joining, leaving and
giving a partition back bump the queue's epoch (``ordering:epoch:<queue>``);
every worker reads it every ``POLL`` seconds and rebalances at once when
it moved, rather than at its next round.

:class:`Assignment` runs in a thread of its own and talks to the backend
alone; it tells the I/O thread what changes through ``post``.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

import structlog

from ..exceptions import BackendError
from .keys import epoch_key, lease_name, member_key, members_key, owner_key, partition_name

if TYPE_CHECKING:
    from ..backend.base import Backend

__all__ = ["Assignment", "Change", "member_id"]

logger = structlog.get_logger("mqtasks.ordering")

#: What the I/O thread is told: ``add`` (consume it), ``release`` (give it up
#: gracefully, then call :meth:`Assignment.released`), ``lost`` (stop at once).
Change = tuple[Literal["add", "release", "lost"], str]

#: Seconds the members set is kept after it was created (stale members are
#: ignored through their liveness keys; the set is recreated by the next refresh).
MEMBERS_TTL = 3600.0

#: Seconds a worker waits after joining before it takes partitions (at most a quarter of
#: the lease time), for the other workers starting with it to join too.
SETTLE = 1.0

#: Seconds between two reads of the epochs (at most a sixth of the lease time).
POLL = 0.25


def member_id() -> str:
    """Return a new member id: ``host:pid:uuid8``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Assignment:
    """Keeps this worker's fair share of the partitions of its ordered queues.

    Args:
        backend: Where members and leases are kept.
        queues: Partition count by base queue.
        lease_ttl: Seconds a lease lasts unless renewed.
        post: Called (from this object's thread) with the changes of a round for the I/O
            thread, all at once (so that it applies them together: a transport may
            share its prefetch window again at each queue it adds).
        member: This worker's member id; a new one by default.
        takeover_delay: Seconds to wait before consuming a partition whose last owner
            did not give it up in good order (its unacked messages come back first).
        state_ttl: Seconds the owner of a partition is remembered.
        settle: Seconds between joining and the first round; ``SETTLE`` (at most a
            quarter of ``lease_ttl``) by default.
    """

    def __init__(
        self,
        backend: Backend,
        queues: Mapping[str, int],
        *,
        lease_ttl: float,
        post: Callable[[list[Change]], None],
        member: str | None = None,
        takeover_delay: float = 0.0,
        state_ttl: float = 86400.0,
        settle: float | None = None,
    ) -> None:
        self.backend = backend
        self.queues = dict(queues)
        self.lease_ttl = lease_ttl
        self.member = member or member_id()
        self.takeover_delay = takeover_delay
        self.state_ttl = state_ttl
        self.settle = min(SETTLE, lease_ttl / 4) if settle is None else settle
        self._poll = min(POLL, lease_ttl / 6)
        self._post_round = post
        #: The changes of the round under way, posted at its end.
        self._round: list[Change] = []
        #: The epoch of each queue as last read (None: not read yet, or unset).
        self._epochs: dict[str, int | None] = {}
        #: Partitions taken over from a worker that died: consumed from this monotonic time.
        self._waiting: dict[tuple[str, int], float] = {}
        #: Owned partitions: (queue, index) -> monotonic time of the last renewal.
        self.owned: dict[tuple[str, int], float] = {}
        self._releasing: set[tuple[str, int]] = set()
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._names = {
            partition_name(q, i, n): (q, i) for q, n in self.queues.items() for i in range(n)
        }
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Held by a round and by stop(): no lease is taken once stop() has released them.
        self._cycling = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Join the members now; take partitions in a thread, after the settle window.

        Raises:
            BackendError: The backend cannot be reached.
        """
        for q in self.queues:
            self._register(q)
            self._epochs[q] = self._bump(q)
        self._thread = threading.Thread(target=self._main, name="mqtasks-ordering", daemon=True)
        self._thread.start()

    def released(self, name: str) -> None:
        """The I/O thread has drained partition queue ``name``: release its lease (any thread)."""
        self._released.put(name)
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, release every lease and leave the members (at shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_ttl)
        with self._cycling:
            self._leave()

    def _give_back(self, part: tuple[str, int]) -> None:
        """Release a partition in good order: its next owner need not wait."""
        self.backend.delete(owner_key(*part))
        self.backend.release_lease(lease_name(*part), self.member)

    def _leave(self) -> None:
        for q, i in list(self.owned):
            try:
                if (q, i) in self._waiting:  # never consumed: the wait passes on
                    self.backend.release_lease(lease_name(q, i), self.member)
                else:
                    self._give_back((q, i))
            except BackendError as exc:
                logger.warning("ordering.release_failed", queue=q, partition=i, error=str(exc))
        self.owned.clear()
        for q in self.queues:
            try:
                self.backend.delete(member_key(q, self.member))
                self._bump(q)
            except BackendError:
                pass  # it expires on its own

    def _bump(self, q: str) -> int:
        """Tell the other workers of ``q`` to rebalance now; return the new epoch."""
        return self.backend.incr(epoch_key(q), ttl=MEMBERS_TTL)

    def _moved(self) -> bool:
        """Whether the epoch of a queue moved since it was last read (and note the new one)."""
        moved = False
        for q in self.queues:
            try:
                raw = self.backend.get(epoch_key(q))
            except BackendError:
                return False  # the next round says so, and expires what it must
            epoch = None if raw is None else int(raw)
            if epoch != self._epochs.get(q):
                self._epochs[q] = epoch
                moved = True
        return moved

    def _main(self) -> None:
        if self._stop.wait(self.settle):
            return
        period = self.lease_ttl / 3
        due = 0.0  # the first round at once
        while not self._stop.is_set():
            now = time.monotonic()
            if self._wake.is_set() or now >= due or self._moved():
                self._wake.clear()
                self.cycle()
                due = time.monotonic() + period
            self._wake.wait(max(0.0, min(self._poll, due - time.monotonic())))

    def cycle(self) -> None:
        """One round: release what was drained, refresh membership, renew, rebalance."""
        with self._cycling:
            if not self._stop.is_set():
                self._cycle()

    def _post(self, change: Change) -> None:
        self._round.append(change)

    def _cycle(self) -> None:
        try:
            self._balance_all()
        finally:
            changes, self._round = self._round, []
            if changes:
                self._post_round(changes)

    def _balance_all(self) -> None:
        try:
            given: set[str] = set()
            while True:
                try:
                    name = self._released.get_nowait()
                except queue.Empty:
                    break
                part = self._names.get(name)
                if part is not None and part in self.owned:
                    self._give_back(part)
                    del self.owned[part]
                    self._releasing.discard(part)
                    given.add(part[0])
                    logger.info("ordering.partition_released", queue=part[0], partition=name)
            for q in given:  # the worker waiting for them takes them now
                self._bump(q)
            for q, count in self.queues.items():
                self._balance(q, count)
            self._post_waited(time.monotonic())
        except BackendError as exc:
            logger.warning("ordering.backend_failed", error=str(exc))
            self._expire(time.monotonic())
        except Exception:  # a bug must not kill the thread that renews the leases
            logger.exception("ordering.assignment_crashed")
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        """Give up the partitions whose leases may have run out while the backend failed."""
        for part, renewed in list(self.owned.items()):
            if now - renewed > self.lease_ttl * 0.8:
                self._lose(part)

    def _post_waited(self, now: float) -> None:
        for part, when in list(self._waiting.items()):
            if part not in self.owned:
                del self._waiting[part]
            elif when <= now:
                del self._waiting[part]
                self._post(("add", partition_name(part[0], part[1], self.queues[part[0]])))

    def _lose(self, part: tuple[str, int]) -> None:
        del self.owned[part]
        self._releasing.discard(part)
        if self._waiting.pop(part, None) is not None:
            return  # never consumed: nothing to stop
        name = partition_name(part[0], part[1], self.queues[part[0]])
        logger.error(
            "ordering.lease_lost",
            queue=part[0],
            partition=name,
            member=self.member,
            note="stopped consuming it; another worker takes it over",
        )
        self._post(("lost", name))

    def _register(self, q: str) -> None:
        self.backend.put(member_key(q, self.member), b"1", self.lease_ttl)
        self.backend.add_member(members_key(q), self.member, ttl=MEMBERS_TTL)

    def _live_members(self, q: str) -> list[str]:
        backend = self.backend
        self._register(q)
        members = backend.members(members_key(q))
        live = {m for m in members if m == self.member or backend.get(member_key(q, m))}
        live.add(self.member)
        return sorted(live)

    def _balance(self, q: str, count: int) -> None:
        backend, me, ttl = self.backend, self.member, self.lease_ttl
        live = self._live_members(q)
        n, rank = len(live), live.index(me)
        share = math.ceil(count / n)
        now = time.monotonic()
        mine = [p for p in self.owned if p[0] == q]
        for part in mine:
            if backend.renew_lease(lease_name(*part), me, ttl):
                self.owned[part] = now
            else:
                self._lose(part)
        active = sorted(p for p in self.owned if p[0] == q and p not in self._releasing)
        owned = sum(1 for p in self.owned if p[0] == q)
        if len(active) > share:
            # Give up first those another member prefers (i % members != my rank).
            extras = sorted(active, key=lambda p: (p[1] % n == rank, p[1]))[: len(active) - share]
            for part in extras:
                self._releasing.add(part)
                name = partition_name(q, part[1], count)
                logger.info("ordering.partition_releasing", queue=q, partition=name, share=share)
                self._post(("release", name))
        elif owned < share:
            need = share - owned
            candidates = sorted(
                (i for i in range(count) if (q, i) not in self.owned),
                key=lambda i: (i % n != rank, i),
            )
            for i in candidates:
                if need <= 0:
                    break
                name = lease_name(q, i)
                if backend.lease_holder(name) is not None:
                    continue
                if backend.acquire_lease(name, me, ttl) is None:
                    continue
                self.owned[(q, i)] = now
                need -= 1
                self._take(q, i, count, share, now)

    def _take(self, q: str, i: int, count: int, share: int, now: float) -> None:
        """Consume a partition just leased, at once unless its last owner left it in disorder."""
        partition = partition_name(q, i, count)
        key = owner_key(q, i)
        last = self.backend.get(key)
        self.backend.put(key, self.member.encode(), self.state_ttl)
        if last is not None and last.decode() != self.member and self.takeover_delay > 0:
            # It died or was cut off holding messages of this partition: a transport
            # hands them back only after a while (Redis: its liveness timeout), and
            # they must be consumed before the later ones.
            self._waiting[(q, i)] = now + self.takeover_delay
            logger.warning(
                "ordering.takeover_wait",
                queue=q,
                partition=partition,
                previous=last.decode(),
                delay=self.takeover_delay,
            )
            return
        logger.info("ordering.partition_taken", queue=q, partition=partition, share=share)
        self._post(("add", partition))
