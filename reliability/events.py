"""Events under a worker SIGKILL: S17, one event stream to three subscriber groups.

The harness emits events (:data:`~reliability.event_tasks.EVENT`) at a steady
rate to the run's own events exchange, where three subscribers, each on a queue
of its own, bind patterns that all match (see :mod:`reliability.event_tasks`).
Worker processes consume all three queues; one is SIGKILLed while it runs a
subscriber, mid-run, and the supervisor replaces it.

Each (event, group) pair is one ledger id, ``<event key>.g<group>``: the
publisher writes ``intent`` and ``confirmed`` (or ``failed``) for the three
ids of an event around its ``emit()``, the subscribers' bodies ``start`` and
``done``, and the dead-letter queues of the three groups are read back as
``dead`` under the same ids. Pass criteria:

* every group ran every confirmed event at least once, or dead-lettered it with
  a reason (``lost`` = 0, over the three ids of each event), and ran nothing
  that was not emitted (``unexpected`` = 0);
* nothing dead-lettered and no failed emit (no fault touches publishing);
* duplicates (a group running one event twice) counted per group and bounded
  by the in-flight window of the killed process.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kombu

from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError

from .app_env import use_app
from .event_tasks import EVENT, GROUPS, build_events_app, group_key, group_queue, payload_key
from .harness import Harness
from .ledger import Classification, Event, LedgerWriter, classify, percentile
from .profiles import BrokerProfile
from .quiescence import wait_quiescent
from .steps import kill_instants, sleep_until
from .workflows import LedgerTail, kill_hits

if TYPE_CHECKING:
    import random

    from .run import Run

__all__ = [
    "EventPlan",
    "PublisherThread",
    "check_restarts",
    "group_figures",
    "kill_running",
    "s17",
    "wait_started",
]

#: Events emitted per second.
EVENT_RATE = 200.0
#: Worker processes, threads each.
WORKERS = 3
CONCURRENCY = 2
#: SIGKILLs per run.
KILLS = 1
#: Events per run, in both profiles: the ci run takes well under a minute per broker.
EVENTS = 2000


@dataclass(frozen=True)
class EventPlan:
    """One event to emit: its key (and event id) and its subscribers' duration."""

    key: str
    ms: float

    @property
    def ids(self) -> list[str]:
        """Its ledger ids, one per group."""
        return [group_key(self.key, g) for g in range(GROUPS)]


def event_ms(rng: random.Random) -> float:
    """A subscriber's duration: 90 % 1-5 ms, 9 % 20-50 ms, 1 % 200-500 ms (mean about
    9 ms: three groups run every event, and a kill still finds one mid-run)."""
    x = rng.random()
    if x < 0.90:
        return round(rng.uniform(1, 5), 2)
    if x < 0.99:
        return round(rng.uniform(20, 50), 2)
    return round(rng.uniform(200, 500), 2)


#: Mean of :func:`event_ms`, seconds (for time estimates only).
EVENT_MEAN_S = 0.0094


class PublisherThread:
    """A publisher thread of a run: its ledger file, the latencies and errors it saw.

    Args:
        run: The run.
        name: Names the thread and the ledger file (``<name>.jsonl``).
        rate: Calls per second.
    """

    def __init__(self, run: Run, name: str, rate: float) -> None:
        self.run = run
        self.rate = rate
        self.ledger = LedgerWriter(run.ledger_dir / f"{name}.jsonl")
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        #: Texts of the errors raised (searched for the broker's password).
        self.texts: set[str] = set()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rel-{name}", daemon=True)

    def start(self) -> None:
        """Start publishing."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the last call (or ``timeout``)."""
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether it is still publishing."""
        return self._thread.is_alive()

    def failed(self, exc: BaseException) -> None:
        """Count an error the publisher's call raised."""
        self.errors[type(exc).__name__] += 1
        if len(self.texts) < 100:
            self.texts.add(f"{exc} {exc!r}")

    def _loop(self) -> None:
        raise NotImplementedError


class EventPublisher(PublisherThread):
    """Emits events at a steady rate from a thread; ``intent``, then ``confirmed``
    or ``failed``, for each of an event's group ids."""

    def __init__(self, run: Run, plans: Sequence[EventPlan], rate: float) -> None:
        super().__init__(run, "publisher", rate)
        self.plans = plans
        self.emitted = 0

    def _loop(self) -> None:
        t0 = time.monotonic()
        try:
            for i, plan in enumerate(self.plans):
                wait = t0 + i / self.rate - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    return
                self.emit(plan)
        finally:
            self.ledger.close()

    def emit(self, plan: EventPlan) -> None:
        """Emit one event now and record it."""
        for i in plan.ids:
            self.ledger.record("intent", i)
        started = time.monotonic()
        try:
            self.run.app.emit(EVENT, {"key": plan.key, "ms": plan.ms}, event_id=plan.key)
        except MQTasksError as exc:
            self.failed(exc)
            for i in plan.ids:
                self.ledger.record("failed", i, error=type(exc).__name__)
            return
        self.latencies.append(time.monotonic() - started)
        self.emitted += 1
        for i in plan.ids:
            self.ledger.record("confirmed", i)

    def summary(self) -> dict[str, Any]:
        """Events emitted, ``emit()`` latency and errors."""
        ms = [x * 1000.0 for x in self.latencies]
        return {
            "events": self.emitted,
            "latency_ms_p50": _round(percentile(ms, 50)),
            "latency_ms_p99": _round(percentile(ms, 99)),
            "latency_ms_max": _round(max(ms, default=None)),
            "errors": dict(self.errors),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def record_group_dead_letters(run: Run, ledger: LedgerWriter) -> dict[str, Any]:
    """Record every dead letter of the three groups' queues as a ``dead`` event under
    its group id; return the entries per group and those without a readable key."""
    per_group: dict[str, int] = {}
    unreadable: list[str] = []
    # A worker that takes an event's queue for its routing key dead-letters it as
    # ``unknown_subscriber`` to ``<event name>.dlq``: counted apart, not per group.
    try:
        misrouted = [e.id for e in list_dead_letters(run.app, EVENT, limit=None)]
    except MQTasksError:
        misrouted = []
    for g in range(GROUPS):
        queue = group_queue(run.queue, g)
        try:
            entries = list_dead_letters(run.app, queue, limit=None)
        except MQTasksError as exc:
            if "does not exist" in str(exc):
                continue
            raise
        per_group[f"g{g}"] = len(entries)
        for e in entries:
            try:
                args = json.loads(e.body).get("args") or [None]
            except (ValueError, AttributeError):
                args = [None]
            key = payload_key(args[0])
            if key is None:
                unreadable.append(e.id)
            ledger.record(
                "dead",
                group_key(key or e.id, g),
                attempt=e.attempts,
                reason=e.reason,
                exception=e.exception,
                group=g,
                message_id=e.id,
            )
    return {
        "by_group": per_group,
        "unreadable": unreadable,
        "under_event_name": len(misrouted),
        "under_event_name_ids": misrouted[:10],
    }


def group_figures(events: Sequence[Event]) -> dict[str, dict[str, Any]]:
    """The protocol's figures per subscriber group (ids ending ``.g<group>``)."""
    out: dict[str, dict[str, Any]] = {}
    for g in range(GROUPS):
        suffix = f".g{g}"
        c = classify(e for e in events if e.id.endswith(suffix))
        out[f"g{g}"] = {
            "confirmed": c.confirmed,
            "executed": c.executed,
            "executed_more_than_once": c.executed_more_than_once,
            "started_more_than_once": c.started_more_than_once,
            "dead_lettered": c.dead_lettered,
            "lost": c.lost,
            "unexpected": c.unexpected,
        }
    return out


def wait_started(run: Run, count: int, timeout: float = 60.0) -> float:
    """Wait until ``count`` workers have logged ``worker.started`` (consuming every
    queue); return the seconds it took, recorded as ``workers_started_s``.

    The faults under test start a worker while work is waiting; the first workers
    of a run start on empty queues, so that what they show is the fault's.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline and run.log_count('"worker.started"') < count:
        time.sleep(0.1)
    took = round(time.monotonic() - t0, 2)
    run.extra["workers_started_s"] = took
    time.sleep(0.2)
    return took


#: Tasks at least this long (ms) are the kills' preferred targets: one of a few
#: milliseconds is often over before the signal lands.
LONG_MS = 20.0


def kill_running(
    run: Run, tail: LedgerTail, ms: Mapping[str, float], wait: float = 10.0
) -> dict[str, Any]:
    """SIGKILL a worker while it runs a task of at least :data:`LONG_MS` (by ``ms``, the
    duration of each ledger id), waiting up to ``wait`` s for one; else one running any
    task, else any worker. :func:`~reliability.workflows.kill_hits` says afterwards
    whether the task still ran when the signal landed."""
    deadline = time.monotonic() + wait
    while True:
        running = tail.poll(set(run.pool.pids().values()))
        long = {pid for pid, e in running.items() if ms.get(e.id, 0.0) >= LONG_MS}
        if long or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    slot, pid = run.pool.signal(signal.SIGKILL, rng=run.rng, among=long or set(running) or None)
    hit = running.get(pid)
    return run.fault(
        "SIGKILL",
        slot=slot,
        pid=pid,
        at=time.time(),
        running=None if hit is None else {"key": hit.id, **hit.info},
    )


def s17(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Events to three subscriber groups through a worker SIGKILL: each group runs each
    event at least once, nothing lost, duplicates reported."""
    with h.run("S17", broker, workers=WORKERS, concurrency=CONCURRENCY) as run:
        started = time.time()
        try:
            return _s17(run, started)
        finally:
            run.pool.stop(timeout=10)
            run.extra["cleanup"] = _drop_topology(run)


def _s17(run: Run, started: float) -> dict[str, Any]:
    exchange = {"MQTASKS_EVENTS_EXCHANGE": f"{run.queue}.events"}
    use_app(run, "reliability.event_tasks", build_events_app, exchange)
    n = EVENTS
    plans = [EventPlan(run.new_id(), event_ms(run.rng)) for _ in range(n)]
    run.extra["events"] = n
    run.extra["groups"] = GROUPS
    publish_s = n / EVENT_RATE
    est = n * GROUPS * (EVENT_MEAN_S + 0.005) / (WORKERS * CONCURRENCY)
    tail = LedgerTail(run.ledger_dir)
    run.pool.start()
    wait_started(run, WORKERS)
    publisher = EventPublisher(run, plans, EVENT_RATE)
    publisher.start()
    ms = {i: p.ms for p in plans for i in p.ids}
    for t in kill_instants(run, KILLS, 3.0, max(4.0, 0.7 * publish_s)):
        sleep_until(run, t)
        kill_running(run, tail, ms)
    publisher.join()
    wait_quiescent(run, max(120.0, 4 * est + 60))
    dead_ledger = LedgerWriter(run.ledger_dir / "dead.jsonl")
    run.extra["dlq"] = record_group_dead_letters(run, dead_ledger)
    dead_ledger.close()
    misrouted = run.extra["dlq"]["under_event_name"]
    run.check("dead_letters_under_event_name", misrouted == 0, misrouted, "0")
    events = run.events()
    c = classify(events)
    run.extra["by_group"] = group_figures(events)
    run.extra["publisher"] = publisher.summary()
    run.worker_recovery(events)
    kill_hits(run, events)
    _judge(run, c, publisher, run.extra["by_group"])
    return run.result(c, started=started)


def _judge(
    run: Run, c: Classification, publisher: EventPublisher, by_group: dict[str, dict[str, Any]]
) -> None:
    # In flight on the killed process: what its threads run, and a prefetch
    # window per queue it consumes (the three groups').
    bound = KILLS * (run.concurrency + run.prefetch * len(run.app.task_queues()))
    run.standard_checks(c, dup_bound=bound)
    run.check(
        "every_group_ran_every_event",
        all(g["lost"] == 0 and g["confirmed"] == publisher.emitted for g in by_group.values()),
        {k: (g["confirmed"], g["executed"], g["lost"]) for k, g in by_group.items()},
        "per group: every emitted event confirmed, and executed or dead-lettered",
    )
    limit = 40.0 if run.is_redis else 5.0
    worst = [f.get("recovery_s") for f in run.faults]
    run.check(
        "recovery_s",
        all(w is not None and w <= limit for w in worst),
        worst,
        f"<= {limit:.0f} s per kill",
    )
    check_restarts(run, KILLS)
    if publisher.texts and run.password:
        shown = sum(t.count(run.password) for t in publisher.texts)
        run.check("password_never_shown_by_emit", shown == 0, shown, "0")


def check_restarts(run: Run, kills: int) -> None:
    """Check that the supervisor replaced each of the ``kills`` killed workers within 1 s."""
    restarts = [e for e in run.pool.exits if e.restarted_at is not None]
    run.check(
        "supervisor_restart_s",
        len(restarts) >= kills
        and all(e.restarted_at is not None and e.restarted_at - e.t <= 1.0 for e in restarts),
        len(restarts),
        f"{kills} killed workers, each replaced within 1 s",
    )


def _drop_topology(run: Run) -> str:
    """Delete the groups' queues and the run's exchange on RabbitMQ (Redis: the run's
    key prefix, which :meth:`Run.close` removes, holds them)."""
    if run.is_redis:
        return "key prefix removed with the run"
    try:
        from mqtasks.transport.base import dead_letter_spec

        specs = [run.app.queue(group_queue(run.queue, g)) for g in range(GROUPS)]
        specs.append(run.app.queue(EVENT))  # made by a worker that misread a queue's name
        run.app.transport.delete([*specs, *(dead_letter_spec(s) for s in specs)])
        with kombu.Connection(run.url) as conn:
            kombu.Exchange(run.app.settings.events_exchange, type="topic").bind(
                conn.channel()
            ).delete()
    except Exception as exc:
        return f"cleanup failed: {type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        run.app.close()
    return f"{GROUPS} group queues and the exchange deleted"
