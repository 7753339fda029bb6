"""Workflows under faults: S16, chords under worker SIGKILL.

Each chord has ten members (``rel.chord_member``, W-mix durations) and a
callback (``rel.chord_callback``) that sums their values. The harness publishes
the chords at a steady rate, SIGKILLs a worker three times while members run
(the supervisor replaces it, as in S1), then calls every chord handle's
``get()`` and reads the result backend back.

The ledger is written by the task bodies under logical keys (see
:mod:`reliability.workflow_tasks`), so a callback copy the worker skips before
running it is not counted as a start. Pass criteria:

* every chord's callback **completed** exactly once (``done`` lines per chord
  key); starts are reported apart: a callback killed mid-run runs again;
* the callback received its members' values in header order, and every
  handle's ``get()`` returned their sum;
* nothing lost: every member executed at least once or was dead-lettered with
  a reason;
* the backend holds exactly one final result per chord, SUCCEEDED with the sum.

Result backends: RabbitMQ quorum (RQ) with Redis (the shared server, a key
prefix of the run's own), Redis (RD) with PostgreSQL (the shared server, a
table prefix of the run's own); both are removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqtasks._url import mask_url
from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError

from .harness import Harness
from .ledger import Event, LedgerWriter, classify, percentile
from .profiles import BrokerProfile
from .steps import kill_instants, sleep_until
from .workflow_tasks import CALLBACK, MEMBER, build_workflow_app, ledger_key, member_key
from .workload import WMIX_MEAN_S, wmix_ms

if TYPE_CHECKING:
    from .run import Run

__all__ = ["ChordPlan", "StateStore", "s16"]

#: Members per chord.
CHORD_SIZE = 10
#: SIGKILLs per run.
KILLS = 3
#: Chords published per second (members: ten times as many, S1's 200/s).
CHORD_RATE = 20.0
#: Shared stores the result backends live in (a prefix of the run's own in each).
REDIS_BACKEND_URL = os.environ.get("RELIABILITY_BACKEND_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_BACKEND_URL = os.environ.get(
    "RELIABILITY_BACKEND_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
#: Ids listed per figure.
SAMPLES = 10


@dataclass(frozen=True)
class ChordPlan:
    """One chord to publish: its key, its members' values and durations."""

    key: str
    values: tuple[int, ...]
    member_ms: tuple[float, ...]
    callback_ms: float

    @property
    def expected(self) -> int:
        """What the callback returns: the sum of the members' values."""
        return sum(self.values)

    @property
    def member_keys(self) -> list[str]:
        """Ledger keys of the members, in header order."""
        return [member_key(self.key, i) for i in range(len(self.values))]


def plan_chords(run: Run, n: int) -> list[ChordPlan]:
    """``n`` chords of :data:`CHORD_SIZE` W-mix members with random values."""
    plans = []
    for _ in range(n):
        key = run.new_id()
        values = tuple(run.rng.randrange(1, 10**6) for _ in range(CHORD_SIZE))
        ms = tuple(wmix_ms(run.rng) for _ in range(CHORD_SIZE))
        plans.append(ChordPlan(key, values, ms, round(run.rng.uniform(20, 200), 2)))
    return plans


class StateStore:
    """The result backend of one run: a URL and key prefix of its own in a shared store.

    Args:
        kind: ``redis`` or ``postgresql``.
        tag: Makes the prefix unique.
    """

    def __init__(self, kind: str, tag: str) -> None:
        self.kind = kind
        self.prefix = f"rel_s16_{tag}_"
        if kind == "redis":
            self.url = REDIS_BACKEND_URL
        elif kind == "postgresql":
            sep = "&" if "?" in POSTGRES_BACKEND_URL else "?"
            self.url = f"{POSTGRES_BACKEND_URL}{sep}table_prefix={self.prefix}"
        else:
            raise ValueError(f"no state store of kind {kind!r}")

    def env(self) -> dict[str, str]:
        """Environment of the workers and of the harness's app."""
        return {"MQTASKS_BACKEND_URL": self.url, "MQTASKS_BACKEND_KEY_PREFIX": self.prefix}

    def describe(self) -> dict[str, str]:
        """JSON-able description for the result file (password masked)."""
        return {"kind": self.kind, "url": mask_url(self.url), "prefix": self.prefix}

    def raw_finals(self, ids: Sequence[str]) -> dict[str, int] | None:
        """How many stored records the store itself holds for each id (None: unknown).

        Counted from the store's own keys or rows, not through the backend's
        API, so a second record beside the first would show.
        """
        if self.kind == "redis":
            return self._redis_counts(ids)
        return self._postgres_counts(ids)

    def _redis_counts(self, ids: Sequence[str]) -> dict[str, int]:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            counts: Counter[str] = Counter()
            wanted = set(ids)
            for raw in client.scan_iter(match=f"{self.prefix}*", count=1000):
                key = raw.decode(errors="replace")
                for part in key[len(self.prefix) :].split(":"):
                    if part in wanted and _is_result_key(key, part):
                        counts[part] += 1
            return {i: counts[i] for i in ids}
        finally:
            client.close()

    def _postgres_counts(self, ids: Sequence[str]) -> dict[str, int] | None:
        import psycopg

        with psycopg.connect(POSTGRES_BACKEND_URL, autocommit=True) as conn:
            tables = [
                r[0] for r in conn.execute(_TABLES_SQL, (self.prefix.replace("_", r"\_") + "%",))
            ]
            results = [t for t in tables if t.endswith("results")]
            if not results:
                return None
            table = results[0]
            col = _id_column(conn, table)
            if col is None:
                return None
            rows = conn.execute(
                f'SELECT "{col}", count(*) FROM "{table}" WHERE "{col}" = ANY(%s) GROUP BY 1',
                (list(ids),),
            ).fetchall()
        counts = {str(k): int(v) for k, v in rows}
        return {i: counts.get(i, 0) for i in ids}

    def drop(self) -> dict[str, int]:
        """Remove everything the run stored; return what was removed."""
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i : i + 1000])
                return {"keys": len(keys)}
            finally:
                client.close()
        import psycopg

        with psycopg.connect(POSTGRES_BACKEND_URL, autocommit=True) as conn:
            like = self.prefix.replace("_", r"\_") + "%"
            tables = [r[0] for r in conn.execute(_TABLES_SQL, (like,))]
            for t in tables:
                conn.execute(f'DROP TABLE IF EXISTS "{t}" CASCADE')
        return {"tables": len(tables)}


_TABLES_SQL = (
    "SELECT table_name FROM information_schema.tables "
    "WHERE table_schema = current_schema() AND table_name LIKE %s"
)


def _is_result_key(key: str, task_id: str) -> bool:
    """Whether Redis key ``key`` holds the result record of ``task_id`` (not a chord's state)."""
    rest = key.split(task_id, 1)[1]
    return rest == ""


def _id_column(conn: Any, table: str) -> str | None:
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
            (table,),
        )
    ]
    for name in ("task_id", "id", "key"):
        if name in cols:
            return name
    return None


@dataclass
class ChordCall:
    """What publishing one chord and waiting for it gave."""

    plan: ChordPlan
    handle: Any = None
    chord_id: str | None = None
    publish_s: float | None = None
    publish_error: str | None = None
    #: ``ok``, ``wrong``, ``timeout``, ``failed`` (``TaskFailed``) or ``error``.
    get: str | None = None
    value: Any = None
    get_error: str | None = None


class ChordPublisher:
    """Publishes chords at a steady rate from a thread; records the ledger.

    Before ``delay()``: ``intent`` for the chord's key and each member key; after
    it: ``confirmed`` for all of them, or ``failed`` with the error.
    """

    def __init__(self, run: Run, plans: Sequence[ChordPlan], rate: float) -> None:
        self.run = run
        self.calls = [ChordCall(p) for p in plans]
        self.rate = rate
        self.ledger = LedgerWriter(run.ledger_dir / "publisher.jsonl")
        self.errors: Counter[str] = Counter()
        self.texts: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="rel-chords", daemon=True)
        self.stop = threading.Event()
        self.finished_at: float | None = None

    def start(self) -> None:
        """Start publishing."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the last chord (or ``timeout``)."""
        self._thread.join(timeout)

    def _loop(self) -> None:
        from mqtasks.canvas import chord

        app = self.run.app
        member = app.tasks[MEMBER]
        callback = app.tasks[CALLBACK]
        t0 = time.monotonic()
        for i, call in enumerate(self.calls):
            if self.stop.is_set():
                break
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            p = call.plan
            keys = [p.key, *p.member_keys]
            for k in keys:
                self.ledger.record("intent", k)
            header = [
                member.s(k, v, ms)
                for k, v, ms in zip(p.member_keys, p.values, p.member_ms, strict=True)
            ]
            started = time.monotonic()
            try:
                handle = chord(header, callback.s(p.key, p.callback_ms)).delay()
            except Exception as exc:
                call.publish_error = f"{type(exc).__name__}: {exc}"
                self.errors[type(exc).__name__] += 1
                self.texts.add(f"{exc} {exc!r}")
                for k in keys:
                    self.ledger.record("failed", k, error=type(exc).__name__)
                continue
            call.publish_s = time.monotonic() - started
            call.handle = handle
            call.chord_id = str(handle.id)
            for k in keys:
                self.ledger.record("confirmed", k, chord_id=call.chord_id)
        self.finished_at = time.time()
        self.ledger.close()

    def summary(self) -> dict[str, Any]:
        """Chords published, ``delay()`` latency and errors."""
        lat = [c.publish_s for c in self.calls if c.publish_s is not None]
        return {
            "chords": sum(1 for c in self.calls if c.handle is not None),
            "latency_ms_p50": _ms(percentile(lat, 50)),
            "latency_ms_p99": _ms(percentile(lat, 99)),
            "latency_ms_max": _ms(max(lat, default=None)),
            "errors": dict(self.errors),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def collect(calls: Sequence[ChordCall], deadline: float) -> None:
    """Call every handle's ``get()`` until ``deadline`` (epoch seconds); fill each call."""
    from mqtasks.exceptions import ResultTimeout, TaskFailed

    for call in calls:
        if call.handle is None:
            continue
        try:
            value = call.handle.get(timeout=max(0.5, deadline - time.time()))
        except ResultTimeout as exc:
            call.get, call.get_error = "timeout", str(exc)
            continue
        except TaskFailed as exc:
            call.get, call.get_error = "failed", f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:
            call.get, call.get_error = "error", f"{type(exc).__name__}: {exc}"
            continue
        call.value = value
        call.get = "ok" if value == call.plan.expected else "wrong"


def record_dead_letters(run: Run, ledger: LedgerWriter) -> dict[str, Any]:
    """Record every dead letter of the run's queue as a ``dead`` event under its ledger key.

    Returns the entries per task and those whose key could not be read.
    """
    try:
        entries = list_dead_letters(run.app, run.queue, limit=None)
    except MQTasksError as exc:
        if "does not exist" in str(exc):
            return {"entries": 0}
        raise
    per_task: Counter[str] = Counter()
    unreadable: list[str] = []
    for e in entries:
        per_task[str(e.task)] += 1
        try:
            args = json.loads(e.body).get("args") or []
        except (ValueError, AttributeError):
            args = []
        key = ledger_key(e.task, args)
        if key is None:
            unreadable.append(e.id)
            key = e.id
        ledger.record(
            "dead",
            key,
            attempt=e.attempts,
            reason=e.reason,
            exception=e.exception,
            task=e.task,
            message_id=e.id,
        )
    return {"entries": len(entries), "by_task": dict(per_task), "unreadable": unreadable}


def kill_while_member_runs(run: Run, wait: float = 10.0) -> dict[str, Any]:
    """SIGKILL a worker that is running a chord member (waiting up to ``wait`` s for one)."""
    deadline = time.monotonic() + wait
    running: dict[int, str] = {}
    while True:
        alive = set(run.pool.pids().values())
        last: dict[int, Event] = {}
        for e in run.events():
            if e.pid in alive and e.kind in ("start", "done"):
                last[e.pid] = e  # type: ignore[index]
        running = {
            pid: e.id
            for pid, e in last.items()
            if e.kind == "start" and e.info.get("task") == MEMBER
        }
        if running or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    slot, pid = run.pool.signal(signal.SIGKILL, rng=run.rng, among=set(running) or None)
    return run.fault("SIGKILL", slot=slot, pid=pid, at=time.time(), member_running=running.get(pid))


@dataclass
class CallbackView:
    """The ledger lines of one chord's callback."""

    starts: list[Event] = field(default_factory=list)
    dones: list[Event] = field(default_factory=list)


def _evidence(run: Run, key: str, call: ChordCall, view: CallbackView) -> dict[str, Any]:
    """What the ledger and the faults say about one chord's callback."""
    kills = [(f["t"], f["pid"]) for f in run.faults if f["kind"] == "SIGKILL"]
    return {
        "chord_key": key,
        "chord_id": call.chord_id,
        "get": call.get,
        "lines": [
            {
                "kind": e.kind,
                "t": run.rel(e.t),
                "pid": e.pid,
                "attempt": e.attempt,
                "message_id": e.info.get("message_id"),
            }
            for e in sorted(view.starts + view.dones, key=lambda e: e.t)
        ],
        "kills": kills,
    }


def s16(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Chords under worker SIGKILL: each callback completes once, each ``get()`` is right."""
    with h.run("S16", broker) as run:
        started = time.time()
        store = StateStore(
            "redis" if broker in ("RQ", "RC") else "postgresql", secrets.token_hex(4)
        )
        run.extra["backend"] = store.describe()
        try:
            return _s16(run, store, started)
        finally:
            with contextlib.suppress(Exception):
                run.app.close()
            try:
                run.extra["backend_removed"] = store.drop()
            except Exception as exc:
                run.notes.append(f"backend cleanup failed: {type(exc).__name__}: {exc}")


def _s16(run: Run, store: StateStore, started: float) -> dict[str, Any]:
    run.env.update(store.env())
    run.pool.env.update(store.env())
    run.pool.argv = [
        "reliability.workflow_tasks" if a == "reliability.tasks" else a for a in run.pool.argv
    ]
    run.app.close()
    run.app = build_workflow_app(run.env)
    n = run.profile.n(1000)
    plans = plan_chords(run, n)
    members = n * CHORD_SIZE
    est = members * (WMIX_MEAN_S + 0.01) / run.workers
    run.pool.start()
    time.sleep(1.5)
    publisher = ChordPublisher(run, plans, CHORD_RATE)
    publisher.start()
    publish_s = n / CHORD_RATE
    for t in kill_instants(run, KILLS, 3.0, max(10.0, 0.7 * min(est, publish_s + est / 2))):
        sleep_until(run, t)
        kill_while_member_runs(run)
    publisher.join()
    get_deadline = time.time() + max(90.0, 3 * est)
    collect(publisher.calls, get_deadline)
    ok = run.wait_quiescent(max(60.0, est))
    run.check("quiescent", ok, ok, "queues empty, ledger quiet")
    dead_ledger = LedgerWriter(run.ledger_dir / "dead.jsonl")
    run.extra["dlq"] = record_dead_letters(run, dead_ledger)
    dead_ledger.close()
    events = run.events()
    _judge(run, store, publisher, events)
    run.extra["publisher"] = publisher.summary()
    run.worker_recovery(events)
    member_events = [e for e in events if e.info.get("task") != CALLBACK and ".m" in e.id]
    c = classify(member_events)
    run.standard_checks(c, dup_bound=None, dead=None)
    run.check(
        "dead_letters_have_reasons",
        all(e.info.get("reason") for e in events if e.kind == "dead"),
        sum(1 for e in events if e.kind == "dead"),
        "every dead letter names its reason",
    )
    if publisher.texts and run.password:
        shown = sum(t.count(run.password) for t in publisher.texts)
        run.check("password_never_shown_by_chords", shown == 0, shown, "0")
    restarts = [e for e in run.pool.exits if e.restarted_at is not None]
    run.check(
        "supervisor_restart_s",
        len(restarts) >= KILLS
        and all(e.restarted_at is not None and e.restarted_at - e.t <= 1.0 for e in restarts),
        len(restarts),
        f"{KILLS} killed workers, each replaced within 1 s",
    )
    return run.result(c, started=started)


def _judge(run: Run, store: StateStore, publisher: ChordPublisher, events: list[Event]) -> None:
    """The chord checks: callback completions, values, ``get()``, the stored results."""
    calls = {c.plan.key: c for c in publisher.calls}
    views: dict[str, CallbackView] = defaultdict(CallbackView)
    dead_members: set[str] = set()
    for e in events:
        if e.info.get("task") == CALLBACK and e.kind == "start":
            views[e.id].starts.append(e)
        elif e.info.get("task") == CALLBACK and e.kind == "done":
            views[e.id].dones.append(e)
        elif e.kind == "dead" and e.info.get("task") == MEMBER:
            dead_members.add(e.id.rsplit(".m", 1)[0])
    published = [k for k, c in calls.items() if c.handle is not None]
    # A chord whose member was dead-lettered must never run its callback.
    whole = [k for k in published if k not in dead_members]
    never = [k for k in whole if not views[k].dones]
    twice = [k for k in published if len(views[k].dones) > 1]
    restarted = [k for k in published if len(views[k].starts) > 1]
    ran_anyway = [k for k in dead_members if views[k].dones]
    wrong_values = [
        k
        for k in published
        for d in views[k].dones
        if d.info.get("values") != list(calls[k].plan.values)
    ]
    run.extra["chords"] = {
        "published": len(published),
        "with_dead_member": len(dead_members),
        "callback_started_more_than_once": len(restarted),
        "callback_completed_more_than_once": len(twice),
        "callback_never_completed": len(never),
        "callback_starts": sum(len(v.starts) for v in views.values()),
        "callback_dones": sum(len(v.dones) for v in views.values()),
    }
    samples = {
        "callback_completed_more_than_once": [
            _evidence(run, k, calls[k], views[k]) for k in twice[:SAMPLES]
        ],
        "callback_started_more_than_once": [
            _evidence(run, k, calls[k], views[k]) for k in restarted[:SAMPLES]
        ],
        "callback_never_completed": [
            _evidence(run, k, calls[k], views[k]) for k in never[:SAMPLES]
        ],
    }
    run.extra["chord_samples"] = {k: v for k, v in samples.items() if v}
    run.check("callback_completed_more_than_once", not twice, len(twice), "0 chords")
    run.check("callback_never_completed", not never, len(never), "0 chords (all members done)")
    run.check("callback_after_dead_member", not ran_anyway, sorted(ran_anyway)[:SAMPLES], "none")
    run.check(
        "callback_values_in_order", not wrong_values, sorted(set(wrong_values))[:SAMPLES], "all"
    )
    run.check(
        "publish_failed", len(published) == len(calls), len(calls) - len(published), "0 chords"
    )

    # get(): the sum for every whole chord; TaskFailed for one with a dead member.
    gets = Counter(str(c.get) for c in calls.values() if c.handle is not None)
    run.extra["get"] = dict(gets)
    bad_get = [
        {
            "chord_key": k,
            "chord_id": c.chord_id,
            "get": c.get,
            "value": c.value,
            "expected": c.plan.expected,
            "error": c.get_error,
        }
        for k, c in calls.items()
        if c.handle is not None and (c.get != "ok" if k not in dead_members else c.get != "failed")
    ]
    run.check("get_right_value", not bad_get, bad_get[:SAMPLES], "every handle's get() = sum")

    # The backend: one final SUCCEEDED record with the sum, per chord.
    _check_backend(run, store, [calls[k] for k in whole])


def _check_backend(run: Run, store: StateStore, calls: Sequence[ChordCall]) -> None:
    """Read every chord's stored result through the backend and count the raw records."""
    from mqtasks.result import decode_outcome

    ids = [str(c.chord_id) for c in calls]
    backend = run.app.backend
    stored = backend.get_results(ids)
    wrong: list[dict[str, Any]] = []
    states: Counter[str] = Counter()
    for call, got in zip(calls, stored, strict=True):
        if got is None:
            states["absent"] += 1
            wrong.append({"chord_id": call.chord_id, "stored": None})
            continue
        record, final = got
        outcome = decode_outcome(record)
        states[outcome.state] += 1
        if not final or outcome.state != "SUCCEEDED" or outcome.value != call.plan.expected:
            wrong.append(
                {
                    "chord_id": call.chord_id,
                    "final": final,
                    "state": outcome.state,
                    "value": outcome.value,
                    "expected": call.plan.expected,
                }
            )
    run.extra["backend_states"] = dict(states)
    run.check("backend_final_result", not wrong, wrong[:SAMPLES], "one final SUCCEEDED = sum each")
    raw = store.raw_finals(ids)
    if raw is None:
        run.notes.append("raw record count: the store's layout is unknown")
        return
    counts = Counter(raw.values())
    run.extra["backend_raw_records"] = {str(k): v for k, v in sorted(counts.items())}
    off = [i for i, v in raw.items() if v != 1]
    run.check("backend_one_record", not off, off[:SAMPLES], "1 stored record per chord id")
