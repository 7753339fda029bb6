"""Ordered tasks by key under faults: S18, through worker SIGKILLs and a connection cut.

The harness publishes :data:`~reliability.ordering_tasks.ORDERED` tasks over
:data:`KEYS` keys from :data:`THREADS` publisher threads. Each key belongs to
one thread, which publishes that key's tasks one after the other with their
sequence number (0, 1, 2...) in the arguments, its keys interleaved. Worker
processes (:data:`WORKERS`) share the partition queues; two of them are
SIGKILLed while they run a task, and every connection to the broker (workers'
and publishers') is cut once through the run's TCP proxy. A publish that
raises is tried again with the same task id (a few times), so a message may be
in the queue twice under one id; such duplicates are reported.

Pass criteria, from the ledger:

* **order**: no task of a key started before every earlier task of its key
  (by sequence number) that ever finished had finished its first run: for each
  task, its first ``start`` is not before the latest first ``done`` among the
  earlier ones of its key. A task that never finished (dead-lettered) does not
  hold the later ones back: the feature runs the next one after a dead letter;
* nothing lost: every confirmed task executed, or is in the dead-letter queue
  with a reason (reported by reason: ``sequence_gap`` for a task that arrived
  after a later one of its key had run);
* duplicates and publish failures reported; worker log events of the ordering
  machinery (gaps skipped, leases lost, partitions taken) counted.

The result backend (sequence numbers, partition leases) lives on the machine's
shared Redis under a key prefix of the run's own, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError

from .app_env import use_app
from .events import PublisherThread, check_restarts, event_ms, kill_running, wait_started
from .harness import Harness
from .ledger import Event, LedgerWriter, classify, percentile
from .ordering_tasks import ORDERED, PARTITIONS, build_ordering_app
from .profiles import BrokerProfile
from .quiescence import depths, wait_quiescent
from .steps import kill_instants, sleep_until
from .workflow_tasks import ledger_key
from .workflows import LedgerTail, StateStore, kill_hits

if TYPE_CHECKING:
    from .run import Run

__all__ = ["OrderFigures", "OrderedJob", "dead_never_executed", "order_figures", "s18"]

#: Keys, publisher threads, worker processes and their threads.
KEYS = 200
THREADS = 4
WORKERS = 4
CONCURRENCY = 2
#: Faults, in the order they come.
FAULTS = ("SIGKILL", "connection cut", "SIGKILL")
#: Tasks published per second, all threads together.
RATE = 200.0
#: Tries of one publish (the first and the retries with the same id).
PUBLISH_TRIES = 5
#: Violations listed in the result.
SAMPLES = 10


@dataclass(frozen=True)
class OrderedJob:
    """One ordered task to publish."""

    task_id: str
    key: str
    seq: int
    ms: float


def plan_jobs(run: Run, n: int) -> list[list[OrderedJob]]:
    """``n`` tasks over :data:`KEYS` keys, split by owning thread; each thread's list
    takes its keys in turn, every key's tasks in sequence order."""
    keys = [f"k{i:03d}" for i in range(KEYS)]
    per_key = max(1, n // KEYS)
    plans: list[list[OrderedJob]] = [[] for _ in range(THREADS)]
    for seq in range(per_key):
        for i, key in enumerate(keys):
            plans[i % THREADS].append(OrderedJob(run.new_id(), key, seq, event_ms(run.rng)))
    return plans


class OrderedPublisher(PublisherThread):
    """Publishes one thread's jobs at ``rate``; ``intent`` (with key and sequence
    number), then ``confirmed``, or ``failed`` for each try that raised."""

    def __init__(self, run: Run, index: int, jobs: Sequence[OrderedJob], rate: float) -> None:
        super().__init__(run, f"publisher-{index}", rate)
        self.jobs = jobs
        self.gave_up = 0

    def _loop(self) -> None:
        task = self.run.app.tasks[ORDERED]
        t0 = time.monotonic()
        try:
            for i, job in enumerate(self.jobs):
                wait = t0 + i / self.rate - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    return
                self.ledger.record("intent", job.task_id, order_key=job.key, seq=job.seq)
                for attempt in range(1, PUBLISH_TRIES + 1):
                    started = time.monotonic()
                    try:
                        task.apply_async(
                            (job.task_id, job.key, job.seq, job.ms), task_id=job.task_id
                        )
                    except MQTasksError as exc:
                        self.failed(exc)
                        self.ledger.record(
                            "failed", job.task_id, error=type(exc).__name__, attempt=attempt
                        )
                        if self.stop.wait(0.5 * attempt):
                            return
                        continue
                    self.latencies.append(time.monotonic() - started)
                    self.ledger.record("confirmed", job.task_id, tries=attempt)
                    break
                else:
                    self.gave_up += 1
        finally:
            self.ledger.close()


def publisher_summary(publishers: Sequence[OrderedPublisher]) -> dict[str, Any]:
    """Calls, ``apply_async()`` latency, errors and tasks given up, over all threads."""
    ms = [x * 1000.0 for p in publishers for x in p.latencies]
    errors: Counter[str] = Counter()
    for p in publishers:
        errors.update(p.errors)
    return {
        "threads": len(publishers),
        "confirmed": len(ms),
        "latency_ms_p50": _round(percentile(ms, 50)),
        "latency_ms_p99": _round(percentile(ms, 99)),
        "latency_ms_max": _round(max(ms, default=None)),
        "errors": dict(errors),
        "gave_up": sum(p.gave_up for p in publishers),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclass
class OrderFigures:
    """What the ledger says about order within each key."""

    keys: int = 0
    tasks: int = 0
    #: Tasks whose first start came before an earlier task of their key had
    #: finished its first run (one entry each, with the earlier task it overtook).
    violations: list[dict[str, Any]] = field(default_factory=list)
    #: Tasks that never finished, by key (dead-lettered or lost).
    unfinished: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The counts, and a few violations."""
        return {
            "keys": self.keys,
            "tasks": self.tasks,
            "violations": len(self.violations),
            "keys_violated": len({v["key"] for v in self.violations}),
            "unfinished": sum(len(v) for v in self.unfinished.values()),
            "violation_samples": self.violations[:SAMPLES],
        }


def order_figures(events: Iterable[Event]) -> OrderFigures:
    """Check, per key, that no task started before an earlier one of its key had finished
    its first run.

    Each task's key and sequence number come from its ``intent`` line (``order_key``,
    ``seq``); first starts and first finishes from the ``start``/``done`` lines.
    """
    meta: dict[str, tuple[str, int]] = {}
    first_start: dict[str, float] = {}
    first_done: dict[str, float] = {}
    for e in events:
        if e.kind == "intent" and "order_key" in e.info:
            meta.setdefault(e.id, (str(e.info["order_key"]), int(e.info["seq"])))
        elif e.kind == "start":
            first_start[e.id] = min(e.t, first_start.get(e.id, e.t))
        elif e.kind == "done":
            first_done[e.id] = min(e.t, first_done.get(e.id, e.t))
    by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for task_id, (key, seq) in meta.items():
        by_key[key].append((seq, task_id))
    f = OrderFigures(keys=len(by_key), tasks=len(meta))
    for key, tasks in sorted(by_key.items()):
        latest: tuple[float, int, str] | None = None  # (first done, seq, id) of the earlier ones
        for seq, task_id in sorted(tasks):
            start = first_start.get(task_id)
            if start is not None and latest is not None and start < latest[0]:
                f.violations.append(
                    {
                        "key": key,
                        "seq": seq,
                        "id": task_id,
                        "overtook_seq": latest[1],
                        "overtook_id": latest[2],
                        "started_before_done_ms": round((latest[0] - start) * 1000.0, 3),
                    }
                )
            done = first_done.get(task_id)
            if done is None:
                f.unfinished.setdefault(key, []).append(seq)
            elif latest is None or done > latest[0]:
                latest = (done, seq, task_id)
    return f


def record_dead_letters(run: Run, ledger: LedgerWriter) -> dict[str, Any]:
    """Record every dead letter of the run's queue (where the partitions' go) as a
    ``dead`` event under its task id; return the entries by reason."""
    try:
        entries = list_dead_letters(run.app, run.queue, limit=None)
    except MQTasksError as exc:
        if "does not exist" in str(exc):
            return {"entries": 0}
        raise
    reasons: Counter[str] = Counter()
    for e in entries:
        reasons[str(e.reason)] += 1
        try:
            args = json.loads(e.body).get("args") or []
        except (ValueError, AttributeError):
            args = []
        ledger.record(
            "dead",
            ledger_key(None, args) or e.id,
            attempt=e.attempts,
            reason=e.reason,
            exception=e.exception,
            detail=e.detail,
            message_id=e.id,
            order_key=args[1] if len(args) > 1 else None,
            seq=args[2] if len(args) > 2 else None,
        )
    return {"entries": len(entries), "by_reason": dict(reasons)}


def dead_never_executed(events: Sequence[Event]) -> dict[str, list[dict[str, Any]]]:
    """Dead-lettered tasks that never finished a run, by reason, with key and sequence
    number: confirmed work that only a replay of the dead-letter queue would do."""
    done = {e.id for e in events if e.kind == "done"}
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for e in events:
        if e.kind == "dead" and e.id not in done and e.id not in seen:
            seen.add(e.id)
            out[str(e.info.get("reason"))].append(
                {"id": e.id, "key": e.info.get("order_key"), "seq": e.info.get("seq")}
            )
    return dict(out)


def in_flight_outcomes(run: Run, events: Sequence[Event]) -> None:
    """Say of each SIGKILL what became of the tasks the killed process had started and
    not finished: ran again, or dead-lettered (with the reason), or neither."""
    dead = {e.id: str(e.info.get("reason")) for e in events if e.kind == "dead"}
    for f in run.faults:
        delays = f.get("redelivery_s")
        if f["kind"] != "SIGKILL" or not isinstance(delays, dict):
            continue
        f["in_flight_outcome"] = dict(
            Counter(
                "ran again"
                if delay is not None
                else (f"dead-lettered: {dead[i]}" if i in dead else "neither")
                for i, delay in delays.items()
            )
        )


def ordering_log_figures(run: Run) -> dict[str, int]:
    """Worker log events of the ordering machinery and of the connection, by name
    (lower bounds: a SIGKILL loses a worker's last buffered lines)."""
    found: Counter[str] = Counter()
    for path in sorted((run.dir / "logs").glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"event": "ordering.' not in line and '"event": "broker.' not in line:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                found[str(json.loads(line).get("event"))] += 1
    return dict(sorted(found.items()))


def s18(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Ordered tasks by key through two worker SIGKILLs and a connection cut: no key
    starts a task before an earlier one finished, nothing lost, duplicates reported."""
    with h.run("S18", broker, workers=WORKERS, concurrency=CONCURRENCY, proxy=True) as run:
        started = time.time()
        store = StateStore("redis", secrets.token_hex(4))
        store.prefix = f"rel_s18_{secrets.token_hex(4)}_"
        run.extra["backend"] = store.describe()
        try:
            return _s18(run, store, started)
        finally:
            run.pool.stop(timeout=10)
            run.extra["cleanup"] = _drop_partitions(run)
            try:
                run.extra["backend_removed"] = store.drop()
            except Exception as exc:
                run.extra["backend_removed"] = f"cleanup failed: {type(exc).__name__}: {exc}"


def _s18(run: Run, store: StateStore, started: float) -> dict[str, Any]:
    use_app(run, "reliability.ordering_tasks", build_ordering_app, store.env())
    try:
        run.app.backend.check()
    except MQTasksError as exc:
        run.check("backend_reachable", False, f"{type(exc).__name__}: {exc}", "a round trip")
        return run.result(classify([]), started=started)
    n = run.profile.n(10000, minimum=2000)
    plans = plan_jobs(run, n)
    total = sum(len(p) for p in plans)
    run.extra.update(tasks=total, keys=KEYS, threads=THREADS, partitions=PARTITIONS)
    publish_s = total / RATE
    tail = LedgerTail(run.ledger_dir)
    ms = {j.task_id: j.ms for p in plans for j in p}
    run.pool.start()
    wait_started(run, WORKERS)
    publishers = [OrderedPublisher(run, i, p, RATE / THREADS) for i, p in enumerate(plans)]
    for p in publishers:
        p.start()
    for kind, t in zip(
        FAULTS, kill_instants(run, len(FAULTS), 2.0, max(8.0, 0.8 * publish_s), 2.0), strict=True
    ):
        # Each fault at least 2 s after the previous one ended.
        last = max((f["at"] for f in run.faults), default=0.0)
        sleep_until(run, max(t, run.rel(last) + 2.0))
        if kind == "SIGKILL":
            kill_running(run, tail, ms)
        else:
            assert run.proxy is not None
            f = run.fault("proxy RST", at=time.time())
            f["cut"] = run.proxy.cut()
    for p in publishers:
        p.join()
    wait_quiescent(run, max(180.0, 2 * publish_s + 120))
    dead_ledger = LedgerWriter(run.ledger_dir / "dead.jsonl")
    run.extra["dlq"] = record_dead_letters(run, dead_ledger)
    dead_ledger.close()
    with contextlib.suppress(Exception):
        run.extra["depths_at_end"] = depths(run)
    events = run.events()
    c = classify(events)
    run.extra["publisher"] = publisher_summary(publishers)
    run.extra["ordering_log"] = ordering_log_figures(run)
    run.worker_recovery(events)
    kill_hits(run, events)
    in_flight_outcomes(run, events)
    never = dead_never_executed(events)
    run.extra["dead_never_executed"] = {k: len(v) for k, v in never.items()}
    run.extra["dead_never_executed_samples"] = {k: v[:SAMPLES] for k, v in never.items()}
    for f in run.faults:
        if f["kind"] == "proxy RST":
            f["recovery_s"] = run.first_done_after(events, f["at"])
    order = order_figures(events)
    run.extra["order"] = order.to_dict()
    run.check(
        "order_by_key",
        not order.violations,
        len(order.violations),
        "0 tasks started before an earlier one of their key finished its first run",
    )
    run.standard_checks(c, dup_bound=None, dead=None, publish_failed=None)
    run.check(
        "dead_letters_have_reasons",
        all(e.info.get("reason") for e in events if e.kind == "dead"),
        run.extra["dlq"].get("by_reason", {}),
        "every dead letter names its reason",
    )
    texts = {t for p in publishers for t in p.texts}
    if texts and run.password:
        shown = sum(t.count(run.password) for t in texts)
        run.check("password_never_shown_by_publish", shown == 0, shown, "0")
    check_restarts(run, sum(1 for k in FAULTS if k == "SIGKILL"))
    return run.result(c, started=started)


def _drop_partitions(run: Run) -> str:
    """Delete the partition queues on RabbitMQ (Redis: the run's key prefix holds them,
    and :meth:`Run.close` removes it)."""
    if run.is_redis:
        return "key prefix removed with the run"
    try:
        from mqtasks.ordering.keys import partition_name
        from mqtasks.transport.base import QueueSpec

        specs = [QueueSpec(partition_name(run.queue, i, PARTITIONS)) for i in range(PARTITIONS)]
        run.app.transport.delete(specs)
    except Exception as exc:
        return f"cleanup failed: {type(exc).__name__}: {exc}"
    return f"{PARTITIONS} partition queues deleted"
