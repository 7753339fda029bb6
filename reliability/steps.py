"""The steps scenario functions share: ending a run, timing faults, grouping ledger events.

Every scenario module builds on these, so that "quiescent", the kill instants
and the per-id views of the ledger mean the same in every row.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .ledger import Classification, Event, classify
from .workload import WMIX_MEAN_S

if TYPE_CHECKING:
    from .run import Run

__all__ = [
    "dead_by_id",
    "finish",
    "kill_instants",
    "sigkill_while_publishing",
    "sleep_until",
    "starts_by_id",
    "throughput",
    "wmix_timeout",
]


def finish(
    run: Run, timeout: float, quiet: float | None = None
) -> tuple[list[Event], Classification]:
    """Wait for quiescence (a check), read the dead letters, classify every id.

    Args:
        run: The run to end.
        timeout: Seconds quiescence may take.
        quiet: Quiet seconds that make the run quiescent (None: the profile's).
    """
    ok = run.wait_quiescent(timeout, quiet=quiet)
    run.check("quiescent", ok, ok, f"within {timeout:.0f} s")
    run.extra["dlq_entries"] = run.drain_dead_letters()
    events = run.events()
    return events, classify(events)


def wmix_timeout(run: Run, n: int, extra: float = 0.0) -> float:
    """Seconds ``n`` W-mix tasks may take to reach quiescence on the run's workers."""
    return max(120.0, 4 * n * WMIX_MEAN_S / run.workers + 60 + extra)


def throughput(events: Sequence[Event]) -> float | None:
    """Tasks done per second, from the first intent to the last done."""
    intents = [e.t for e in events if e.kind == "intent"]
    dones = [e.t for e in events if e.kind == "done"]
    if not intents or not dones:
        return None
    span = max(dones) - min(intents)
    return round(len({e.id for e in events if e.kind == "done"}) / span, 1) if span > 0 else None


def sleep_until(run: Run, rel_t: float) -> None:
    """Sleep until ``rel_t`` seconds after the run started (a fault's planned instant)."""
    delay = run.t0 + rel_t - time.time()
    if delay > 0:
        time.sleep(delay)


def kill_instants(
    run: Run, count: int, start: float, end: float, min_gap: float = 1.5
) -> list[float]:
    """``count`` uniformly random instants in [start, end], at least ``min_gap`` apart."""
    end = max(end, start + count * min_gap * 1.5)
    for _ in range(1000):
        ts = sorted(run.rng.uniform(start, end) for _ in range(count))
        if all(b - a >= min_gap for a, b in itertools.pairwise(ts)):
            return ts
    return [start + i * min_gap for i in range(count)]


def sigkill_while_publishing(run: Run, n: int, *, spread: float) -> None:
    """Start the workers, publish ``n`` W-mix tasks at 200/s, and SIGKILL a random
    worker 5 times meanwhile.

    Args:
        run: The run.
        n: Tasks to publish.
        spread: The kills fall at random instants from 2 s to this share of the
            workload's estimated duration (10 s at least).
    """
    run.pool.start()
    time.sleep(1.5)
    run.start_publisher(run.wmix_jobs(n), rate=200)
    est = n * WMIX_MEAN_S / run.workers
    for t in kill_instants(run, 5, 2.0, max(10.0, spread * est)):
        sleep_until(run, t)
        run.kill_worker(signal.SIGKILL)


def starts_by_id(events: Sequence[Event], task: str | None = None) -> dict[str, list[Event]]:
    """The ``start`` events of each id (of task ``task`` only, if given)."""
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.kind == "start" and (task is None or e.info.get("task") == task):
            out.setdefault(e.id, []).append(e)
    return out


def dead_by_id(events: Sequence[Event]) -> dict[str, list[Event]]:
    """The ``dead`` events of each id."""
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.kind == "dead":
            out.setdefault(e.id, []).append(e)
    return out
