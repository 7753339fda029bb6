"""Key lanes: one delivery of a key at a time, in sequence order, on the worker's I/O thread.

A :class:`Lanes` holds, per ``(partition queue, key digest)``, the delivery
running or held in place and those waiting behind it, ordered by their
sequence numbers (``mqtasks-oseq``). It decides which delivery may go to the
worker threads; it never touches the broker and takes no locks (the I/O
thread alone calls it).

Sequencing, per key: the first number seen while the partition is owned is
the baseline (nothing is known after a takeover); then ``last + 1`` runs,
a larger number waits up to ``gap_timeout`` for the missing ones (then they
are skipped and logged), and a number at or below the last one run arrived
too late and is dead-lettered (``sequence_gap``), never run out of order.
The number of a key idle for :data:`IDLE_FORGET` is forgotten (a new baseline).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from .keys import HEADER_OKEY, HEADER_OSEQ

if TYPE_CHECKING:
    from ..transport.base import Delivery

__all__ = ["IDLE_FORGET", "SEQUENCE_GAP", "Dispatch", "Lanes", "lane_of"]

logger = structlog.get_logger("mqtasks.ordering")

#: Dead-letter reason of a delivery whose number is at or below the last one its key ran.
SEQUENCE_GAP = "sequence_gap"

#: What to do with a delivery: run it (None) or dead-letter it with this reason.
Dispatch = tuple["Delivery", "str | None"]

#: Seconds an empty lane's last number is kept; then the key starts afresh.
IDLE_FORGET = 600.0

LaneKey = tuple[str, str]


def lane_of(delivery: Delivery) -> tuple[str, int] | None:
    """Return ``(key digest, sequence number)`` from the headers of ``delivery``, if valid."""
    okey = delivery.headers.get(HEADER_OKEY)
    seq = delivery.headers.get(HEADER_OSEQ)
    if not isinstance(okey, str) or not 0 < len(okey) <= 64:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None
    return okey, seq


@dataclass
class _Lane:
    #: The highest number run (or skipped) since the partition was taken; None: no baseline.
    last: int | None = None
    #: The delivery running or held in place.
    active: Delivery | None = None
    #: When the held active delivery runs again (None: running, or no active one).
    hold_until: float | None = None
    #: Waiting deliveries: ``(seq, arrival, delivery)``, a heap.
    waiting: list[tuple[int, int, Delivery]] = field(default_factory=list)
    #: Since when the next waiting number has been missing its predecessor.
    gap_since: float | None = None
    #: When the lane last emptied.
    idle_since: float = 0.0


class Lanes:
    """Per-key FIFO lanes with sequencing, gap timer and holds in place.

    Args:
        gap_timeout: Seconds to wait for missing sequence numbers of a key.
    """

    def __init__(self, gap_timeout: float) -> None:
        self.gap_timeout = gap_timeout
        self._lanes: dict[LaneKey, _Lane] = {}
        #: Lane of each delivery in a lane (by identity), with its arrival number.
        self._of: dict[int, tuple[LaneKey, int]] = {}
        self._arrivals = itertools.count()
        self._last_sweep = time.monotonic()
        #: Queues being given up: nothing more of them is dispatched (held ones stay held).
        self.frozen: set[str] = set()
        #: Lanes that may have a hold or a gap timer (the I/O thread asks every turn what
        #: is due: it looks at these, not at every key); pruned as they are looked at.
        self._timed: set[LaneKey] = set()

    def __len__(self) -> int:
        """Deliveries held in lanes (running, held or waiting)."""
        return len(self._of)

    def tracks(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is in a lane."""
        return id(delivery) in self._of

    def arrive(self, delivery: Delivery, okey: str, seq: int, now: float) -> list[Dispatch]:
        """Take a new delivery of key ``okey``; return what may be dispatched now."""
        key = (delivery.queue, okey)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.last is not None and seq <= lane.last:
            self._log_late(delivery, okey, seq, lane.last)
            return [(delivery, SEQUENCE_GAP)]
        arrival = next(self._arrivals)
        self._of[id(delivery)] = (key, arrival)
        heapq.heappush(lane.waiting, (seq, arrival, delivery))
        return self._advance(key, lane, now)

    def settled(self, delivery: Delivery, now: float) -> list[Dispatch]:
        """``delivery`` is settled (acked, rejected, requeued, dropped): free its lane."""
        found = self._of.pop(id(delivery), None)
        if found is None:
            return []
        key = found[0]
        lane = self._lanes.get(key)
        if lane is None:
            return []
        if lane.active is delivery:
            lane.active = None
            lane.hold_until = None
        else:  # settled while waiting (a reconnect dropped it)
            lane.waiting = [w for w in lane.waiting if w[2] is not delivery]
            heapq.heapify(lane.waiting)
        return self._advance(key, lane, now)

    def requeue(self, delivery: Delivery) -> list[Delivery]:
        """``delivery`` goes back to the broker unrun: take its whole lane with it.

        Returns ``delivery`` and the deliveries waiting behind it, in order, to hand
        back together; the key's number is forgotten, so they are taken as they come again.
        """
        found = self._of.pop(id(delivery), None)
        if found is None:
            return [delivery]
        key = found[0]
        lane = self._lanes.pop(key, None)
        if lane is None:
            return [delivery]
        behind = sorted(lane.waiting, key=lambda w: w[1])
        for _, _, other in behind:
            self._of.pop(id(other), None)
        if lane.active is not None and lane.active is not delivery:
            # Another one of the key is running: the lane stays for it, empty.
            self._lanes[key] = _Lane(active=lane.active, hold_until=lane.hold_until)
        return [delivery, *(other for _, _, other in behind)]

    def hold(self, delivery: Delivery, until: float) -> None:
        """Keep the running ``delivery`` in place until ``until`` (monotonic), then run it again."""
        found = self._of.get(id(delivery))
        if found is None:
            return
        lane = self._lanes[found[0]]
        if lane.active is delivery:
            lane.hold_until = until
            self._timed.add(found[0])

    def due(self, now: float) -> list[Dispatch]:
        """Return held deliveries whose time has come, and lanes whose gap timed out."""
        ready: list[Dispatch] = []
        for key in list(self._timed):
            lane = self._timed_lane(key)
            if lane is None or key[0] in self.frozen:
                continue
            if lane.active is not None and lane.hold_until is not None:
                if lane.hold_until <= now:
                    lane.hold_until = None
                    ready.append((lane.active, None))
            elif lane.gap_since is not None:
                ready.extend(self._advance(key, lane, now))
        if now - self._last_sweep > 60.0:
            self._sweep(now)
        return ready

    def thaw(self, queue: str, now: float) -> list[Dispatch]:
        """Dispatch from ``queue`` again (it was frozen); return what may run now."""
        self.frozen.discard(queue)
        out: list[Dispatch] = []
        for key, lane in list(self._lanes.items()):
            if key[0] == queue:
                out.extend(self._advance(key, lane, now))
        return out

    def next_due(self) -> float | None:
        """When :meth:`due` has something next (monotonic), or None."""
        times = [
            lane.hold_until
            if lane.hold_until is not None
            else (lane.gap_since + self.gap_timeout if lane.gap_since is not None else None)
            for lane in map(self._timed_lane, list(self._timed))
            if lane is not None
        ]
        return min((t for t in times if t is not None), default=None)

    def _timed_lane(self, key: LaneKey) -> _Lane | None:
        """The lane of ``key`` if it has a hold or a gap timer; else forget ``key``."""
        lane = self._lanes.get(key)
        if lane is None or (lane.hold_until is None and lane.gap_since is None):
            self._timed.discard(key)
            return None
        return lane

    def running(self, queues: Iterable[str] | None = None) -> int:
        """Deliveries of ``queues`` (every queue: None) running in worker threads now."""
        wanted = None if queues is None else set(queues)
        return sum(
            1
            for (queue, _), lane in self._lanes.items()
            if lane.active is not None
            and lane.hold_until is None
            and (wanted is None or queue in wanted)
        )

    def take(self, queue: str | None = None) -> list[Delivery]:
        """Remove the deliveries of ``queue`` (every queue: None) that are not running,
        held ones included; return them in arrival order, to hand back to the broker.

        The sequence state of ``queue`` is forgotten: its partition is given up.
        """
        taken: list[tuple[int, Delivery]] = []
        for key in [k for k in self._lanes if queue is None or k[0] == queue]:
            lane = self._lanes[key]
            for _, arrival, delivery in lane.waiting:
                taken.append((arrival, delivery))
                del self._of[id(delivery)]
            lane.waiting = []
            if lane.active is not None and lane.hold_until is not None:
                delivery = lane.active
                taken.append((self._of.pop(id(delivery))[1], delivery))
                lane.active = lane.hold_until = None
            if lane.active is None:
                del self._lanes[key]
            else:  # running: its settlement frees it; no baseline is kept
                lane.last = lane.gap_since = None
        taken.sort(key=lambda t: t[0])
        return [delivery for _, delivery in taken]

    def _advance(self, key: LaneKey, lane: _Lane, now: float) -> list[Dispatch]:
        out: list[Dispatch] = []
        while lane.active is None and lane.waiting and key[0] not in self.frozen:
            seq, _, delivery = lane.waiting[0]
            last = lane.last
            if last is not None and seq <= last:
                heapq.heappop(lane.waiting)
                del self._of[id(delivery)]
                self._log_late(delivery, key[1], seq, last)
                out.append((delivery, SEQUENCE_GAP))
                continue
            if last is not None and seq > last + 1:
                if lane.gap_since is None:
                    lane.gap_since = now
                    self._timed.add(key)
                if now - lane.gap_since < self.gap_timeout:
                    break
                missing = list(range(last + 1, seq))
                logger.warning(
                    "ordering.gap_skipped",
                    queue=delivery.queue,
                    okey=key[1],
                    missing=missing[:50],
                    waited=round(now - lane.gap_since, 3),
                    note="a later arrival of these numbers is dead-lettered (sequence_gap)",
                )
            heapq.heappop(lane.waiting)
            lane.active, lane.last, lane.gap_since = delivery, seq, None
            out.append((delivery, None))
        if lane.active is None and not lane.waiting:
            lane.gap_since = None
            lane.idle_since = now
        return out

    def _sweep(self, now: float) -> None:
        """Forget the numbers of keys idle for a long time (memory stays bounded)."""
        self._last_sweep = now
        for key in [
            k
            for k, lane in self._lanes.items()
            if lane.active is None and not lane.waiting and now - lane.idle_since > IDLE_FORGET
        ]:
            del self._lanes[key]

    @staticmethod
    def _log_late(delivery: Delivery, okey: str, seq: int, last: int) -> None:
        logger.warning(
            "ordering.late_arrival",
            task_id=delivery.message_id,
            queue=delivery.queue,
            okey=okey,
            seq=seq,
            last=last,
            note="a later task of its key ran already: dead-lettered, not run out of order",
        )
