"""Workflows under faults: S16, chords under worker SIGKILL.

Each chord has ten members (``rel.chord_member``, W-mix durations) and a
callback (``rel.chord_callback``, 100-400 ms) that sums their values. The
harness publishes the chords at a steady rate and SIGKILLs a worker three times
while members run (the supervisor replaces it, as in S1): the first kill aims
at a worker running a member, the second at the worker that ran a chord's last
member while it publishes the callback (before its ack), the third at one
running a callback, so that a callback killed mid-run is redelivered. Then it calls every chord
handle's ``get()`` and reads the result backend back.

The ledger is written by the task bodies under logical keys (see
:mod:`reliability.workflow_tasks`), so a callback copy the worker skips before
running it is not counted as a start. Pass criteria:

* every chord's callback **completed** exactly once (``done`` lines per chord
  key); starts are reported apart: a callback killed mid-run runs again;
* the callback received its members' values in header order, and every
  handle's ``get()`` returned their sum;
* nothing lost: every member executed at least once or was dead-lettered with
  a reason;
* the backend holds one final result per chord, SUCCEEDED with the sum, and
  announced exactly one final write for it (counted from the store's own
  notifications, outside the backend's API).

Result backends: RabbitMQ quorum (RQ) with Redis, Redis (RD) with PostgreSQL,
both on the machine's shared servers (``RELIABILITY_BACKEND_REDIS_URL``,
``RELIABILITY_BACKEND_POSTGRES_URL``) under a key or table prefix of the run's
own, removed at the end.
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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqtasks import TaskHandle, chord
from mqtasks._url import mask_url
from mqtasks.dlq import list_dead_letters
from mqtasks.exceptions import MQTasksError, ResultTimeout, TaskFailed
from mqtasks.middleware.workflow import chord_fired_key
from mqtasks.result import decode_outcome

from .harness import Harness
from .ledger import Event, LedgerWriter, classify, percentile
from .profiles import BrokerProfile
from .steps import kill_instants, sleep_until
from .workflow_tasks import CALLBACK, MEMBER, build_workflow_app, ledger_key, member_key
from .workload import WMIX_MEAN_S, wmix_ms

if TYPE_CHECKING:
    from .run import Run

__all__ = ["ChordFigures", "ChordPlan", "StateStore", "chord_figures", "s16"]

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
        plans.append(ChordPlan(key, values, ms, round(run.rng.uniform(100, 400), 2)))
    return plans


class StateStore:
    """The result backend of one run: a key or table prefix of its own in a shared store.

    Besides the URL, it watches the store from outside the backend's API: each
    final write the backend makes is announced on the store's notification
    channel (Redis ``PUBLISH``, PostgreSQL ``NOTIFY``), and :meth:`start_watch`
    counts those per task id, so a second final write for one chord would show
    even if it left a single record behind.

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
        #: Final writes announced, by task id.
        self.finals: Counter[str] = Counter()
        self.watching = False
        self.watch_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        """Environment of the workers and of the harness's app."""
        return {"MQTASKS_BACKEND_URL": self.url, "MQTASKS_BACKEND_KEY_PREFIX": self.prefix}

    def describe(self) -> dict[str, str]:
        """JSON-able description for the result file (password masked)."""
        return {"kind": self.kind, "url": mask_url(self.url), "prefix": self.prefix}

    # -- watching final writes ------------------------------------------------------

    def start_watch(self) -> None:
        """Count the final writes the store announces from now on (a thread)."""
        ready = threading.Event()
        loop = self._watch_redis if self.kind == "redis" else self._watch_postgres
        self._thread = threading.Thread(
            target=loop, args=(ready,), name="rel-final-writes", daemon=True
        )
        self._thread.start()
        ready.wait(10)

    def _watch_redis(self, ready: threading.Event) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            # Every channel under the prefix; the id follows the last "result:"
            # (the backend may put more, a database number, in between).
            pubsub.psubscribe(f"{self.prefix}*")
            pubsub.get_message(timeout=1.0)  # the subscription's confirmation
            self.watching = True
            ready.set()
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg is not None and msg.get("type") == "pmessage":
                    name = msg["channel"].decode(errors="replace")
                    if "result:" in name:
                        self.finals[name.rsplit("result:", 1)[1]] += 1
        except Exception as exc:
            self.watching = False
            self.watch_error = f"{type(exc).__name__}: {exc}"
        finally:
            ready.set()
            with contextlib.suppress(Exception):
                pubsub.close()
                client.close()

    def _watch_postgres(self, ready: threading.Event) -> None:
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(POSTGRES_BACKEND_URL, autocommit=True) as conn:
                # The backend's channel: its results table's name; payload: key prefix + id.
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"{self.prefix}results")))
                self.watching = True
                ready.set()
                while not self._stop.is_set():
                    for n in conn.notifies(timeout=0.5):
                        payload = n.payload
                        if payload.startswith(self.prefix):
                            payload = payload[len(self.prefix) :]
                        self.finals[payload] += 1
        except Exception as exc:
            self.watching = False
            self.watch_error = f"{type(exc).__name__}: {exc}"
        finally:
            ready.set()

    def stop_watch(self) -> None:
        """Stop counting (after the run is quiescent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # -- cleanup ----------------------------------------------------------------------

    def drop(self) -> dict[str, int]:
        """Remove everything the run stored; return what was removed."""
        self.stop_watch()
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
        from psycopg import sql

        with psycopg.connect(POSTGRES_BACKEND_URL, autocommit=True) as conn:
            like = self.prefix.replace("_", r"\_") + "%"
            found = conn.execute(
                "SELECT c.relname, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'S') "
                "AND c.relname LIKE %s",
                (like,),
            ).fetchall()
            tables = [str(name) for name, kind in found if kind == "r"]
            sequences = [str(name) for name, kind in found if kind == "S"]
            for t in tables:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(t)))
            for q in sequences:
                conn.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(sql.Identifier(q)))
        return {"tables": len(tables), "sequences": len(sequences)}


@dataclass
class ChordCall:
    """What publishing one chord and waiting for it gave."""

    plan: ChordPlan
    handle: TaskHandle | None = None
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


class LedgerTail:
    """What each worker process runs now, from the new lines of the workers' ledger files.

    Reads only what was appended since the last poll, so a poll takes
    milliseconds however long the ledger grew: a kill aimed at a running task
    lands while it still runs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._last: dict[int, Event] = {}
        self._members_done: dict[str, set[str]] = defaultdict(set)
        #: ``done`` lines of members that were the last of their chord to finish, in
        #: the order read: the worker that wrote one is publishing the callback.
        self.completions: list[Event] = []

    def poll(self, alive: Collection[int]) -> dict[int, Event]:
        """The ``start`` line of the task each process in ``alive`` runs now."""
        for path in self.directory.glob("worker-*.jsonl"):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # whole lines only
            self._offsets[path] = offset + end
            for raw in data[:end].splitlines():
                try:
                    e = Event.from_line(raw)
                except ValueError:
                    continue
                if e.pid is not None and e.kind in ("start", "done"):
                    self._last[e.pid] = e
                if e.kind == "done" and e.info.get("task") == MEMBER:
                    done = self._members_done[e.id.rsplit(".m", 1)[0]]
                    if e.id not in done:
                        done.add(e.id)
                        if len(done) == CHORD_SIZE:
                            self.completions.append(e)
        return {pid: e for pid, e in self._last.items() if pid in alive and e.kind == "start"}

    def last(self, pid: int | None) -> Event | None:
        """The last ``start`` or ``done`` line of process ``pid`` read so far."""
        return None if pid is None else self._last.get(pid)


def kill_while_running(run: Run, tail: LedgerTail, task: str, wait: float = 10.0) -> dict[str, Any]:
    """SIGKILL a worker while it runs ``task``, waiting up to ``wait`` s for one.

    Falls back to a worker running a chord member, then to any worker.
    """
    deadline = time.monotonic() + wait
    while True:
        running = tail.poll(set(run.pool.pids().values()))
        wanted = {pid for pid, e in running.items() if e.info.get("task") == task}
        if wanted or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not wanted:
        wanted = {pid for pid, e in running.items() if e.info.get("task") == MEMBER}
    slot, pid = run.pool.signal(signal.SIGKILL, rng=run.rng, among=wanted or None)
    hit = running.get(pid)
    return run.fault(
        "SIGKILL",
        slot=slot,
        pid=pid,
        at=time.time(),
        running=None if hit is None else {"task": hit.info.get("task"), "key": hit.id},
    )


def kill_in_continuation(
    run: Run, tail: LedgerTail, chord_ids: Mapping[str, str], wait: float = 20.0
) -> dict[str, Any]:
    """SIGKILL the worker that ran the last member of a chord once it has claimed
    the chord's callback, before its ack.

    Its task body has returned; the worker stores the outcome, counts the
    member, claims the callback (``chord_fired_key``), publishes it and only
    then acks. The harness reads the claim through the backend and kills the
    worker the moment it appears: in the window where the callback may be
    published or not, and the redelivered member must publish it if it was
    not, and never make it run twice if it was. Falls back to a worker running
    a member after ``wait`` s.

    Args:
        chord_ids: Chord id (the callback's task id) by chord key.
    """
    backend = run.app.backend
    seen = len(tail.completions)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        alive = set(run.pool.pids().values())
        tail.poll(alive)
        for e in tail.completions[seen:]:
            cid = chord_ids.get(e.id.rsplit(".m", 1)[0])
            # Still in that member's continuation: nothing started since its done.
            if cid is None or e.pid not in alive or tail.last(e.pid) is not e:
                continue
            claimed = None
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                if backend.get(chord_fired_key(cid)) is not None:
                    claimed = time.time()
                    break
            slot, pid = run.pool.signal(signal.SIGKILL, among={e.pid})
            at = time.time()
            return run.fault(
                "SIGKILL",
                slot=slot,
                pid=pid,
                at=at,
                running={
                    "task": MEMBER,
                    "key": e.id,
                    "aim": "continuation",
                    "chord_id": cid,
                    "claim_seen_ms_before": None
                    if claimed is None
                    else round((at - claimed) * 1000, 2),
                },
            )
        seen = len(tail.completions)
        time.sleep(0.002)
    return kill_while_running(run, tail, MEMBER)


def kill_hits(run: Run, events: Sequence[Event]) -> None:
    """Say of each kill whether the task it aimed at still ran (its ``done`` came
    after the kill, if ever) or had just ended (ms before the kill)."""
    for f in run.faults:
        aim = f.get("running")
        if not aim:
            continue
        if aim.get("aim") == "continuation":
            ended = [e.t for e in events if e.kind == "done" and e.id == aim["key"]]
            aim["after_done_ms"] = round((f["at"] - min(ended)) * 1000, 1) if ended else None
            # What became of the member and of its chord's callback after the kill.
            chord_key = aim["key"].rsplit(".m", 1)[0]
            later = [e for e in events if e.t > f["at"]]
            aim["member_ran_again"] = any(e.kind == "start" and e.id == aim["key"] for e in later)
            aim["callback_starts"] = sum(
                1 for e in events if e.kind == "start" and e.id == chord_key
            )
            aim["callback_dones"] = sum(1 for e in events if e.kind == "done" and e.id == chord_key)
            continue
        ended = [
            e.t for e in events if e.kind == "done" and e.id == aim["key"] and e.pid == f["pid"]
        ]
        early = [t for t in ended if t <= f["at"]]
        aim["hit"] = (
            "mid-run" if not early else f"ended {round((f['at'] - max(early)) * 1000)} ms before"
        )


#: Worker log events of the workflow machinery counted per run.
WORKFLOW_EVENTS = (
    "workflow.chord_completed",
    "workflow.duplicate_skipped",
    "workflow.step_done_before",
    "workflow.deferred",
    "task.deferred",
    "task.defer_failed",
    "workflow.continuation_crashed",
    "workflow.chord_failed",
    "workflow.invalid",
)
#: Of those, the ones no run without failing tasks or backend outages may log.
WORKFLOW_ERRORS = (
    "workflow.continuation_crashed",
    "workflow.chord_failed",
    "workflow.invalid",
    "task.defer_failed",
)


def workflow_log_figures(run: Run) -> dict[str, Any]:
    """What the workers logged of the chord machinery: events by name, deferrals by
    reason, and how often each chord's callback was published.

    Lower bounds: a worker writes its log lines from a buffer every 0.1 s, so
    a SIGKILL loses the lines of its last moments (a chord completed just
    before the kill shows 0 publishes).
    """
    events: Counter[str] = Counter()
    deferred: Counter[str] = Counter()
    published: Counter[str] = Counter()
    for path in sorted((run.dir / "logs").glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or '"event": "' not in line:
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = data.get("event")
            if name not in WORKFLOW_EVENTS:
                continue
            events[name] += 1
            if name in ("task.deferred", "workflow.deferred"):
                deferred[str(data.get("reason"))] += 1
            elif name == "workflow.chord_completed":
                published[str(data.get("chord_id"))] += 1
    return {
        "events": dict(events),
        "deferred_by_reason": dict(deferred),
        "callback_publishes": published,
    }


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
        removed: dict[str, int] | str
        try:
            row = _s16(run, store, started)
        finally:
            # Workers stopped first: none writes to the store after it is emptied.
            run.pool.stop(timeout=10)
            with contextlib.suppress(Exception):
                run.app.close()
            try:
                removed = store.drop()
            except Exception as exc:
                removed = f"cleanup failed: {type(exc).__name__}: {exc}"
        row["backend_removed"] = removed
        return row


def _s16(run: Run, store: StateStore, started: float) -> dict[str, Any]:
    run.env.update(store.env())
    run.pool.env.update(store.env())
    run.pool.argv = [
        "reliability.workflow_tasks" if a == "reliability.tasks" else a for a in run.pool.argv
    ]
    run.app.close()
    run.app = build_workflow_app(run.env)
    try:
        run.app.backend.check()
    except MQTasksError as exc:
        # Workers would exit at start, over and over, and every chord fail to send.
        run.check("backend_reachable", False, f"{type(exc).__name__}: {exc}", "a round trip")
        return run.result(classify([]), started=started)
    n = run.profile.n(1000)
    plans = plan_chords(run, n)
    members = n * CHORD_SIZE
    est = members * (WMIX_MEAN_S + 0.01) / run.workers
    store.start_watch()
    tail = LedgerTail(run.ledger_dir)
    run.pool.start()
    time.sleep(1.5)
    publisher = ChordPublisher(run, plans, CHORD_RATE)
    publisher.start()
    publish_s = n / CHORD_RATE
    for i, t in enumerate(
        kill_instants(run, KILLS, 3.0, max(10.0, 0.7 * min(est, publish_s + est / 2)))
    ):
        # At least 2 s after the previous kill (the second one waits for a
        # callback and may end past the third's instant): one fault at a time.
        last = max((f["at"] for f in run.faults), default=0.0)
        sleep_until(run, max(t, run.rel(last) + 2.0))
        # A member mid-run; the member completing a chord, killed while it
        # publishes the callback, before its ack; a callback mid-run (redelivered:
        # the copy the chord's exactly-once machinery must handle).
        if i == 0:
            kill_while_running(run, tail, MEMBER)
        elif i == 1:
            chord_ids = {c.plan.key: c.chord_id for c in publisher.calls if c.chord_id}
            kill_in_continuation(run, tail, chord_ids)
        else:
            # Callbacks queue behind the members published before them: on a
            # backlog they run late, so this one may wait for the members to end.
            kill_while_running(run, tail, CALLBACK, wait=max(60.0, 2 * est))
    publisher.join()
    get_deadline = time.time() + max(120.0, 3 * est)
    collect(publisher.calls, get_deadline)
    ok = run.wait_quiescent(max(60.0, est))
    run.check("quiescent", ok, ok, "queues empty, ledger quiet")
    store.stop_watch()
    dead_ledger = LedgerWriter(run.ledger_dir / "dead.jsonl")
    run.extra["dlq"] = record_dead_letters(run, dead_ledger)
    dead_ledger.close()
    events = run.events()
    _judge(run, store, publisher, events)
    logged = workflow_log_figures(run)
    publishes: Counter[str] = logged.pop("callback_publishes")
    ids = [str(c.chord_id) for c in publisher.calls if c.chord_id is not None]
    logged["callback_publishes"] = {
        str(k): v for k, v in sorted(Counter(publishes.get(i, 0) for i in ids).items())
    }
    logged["callback_republished"] = [i for i in ids if publishes.get(i, 0) > 1][:SAMPLES]
    run.extra["workflow_log"] = logged
    errors = {k: v for k, v in logged["events"].items() if k in WORKFLOW_ERRORS}
    run.check("workflow_errors_logged", not errors, errors, "none")
    run.extra["publisher"] = publisher.summary()
    run.worker_recovery(events)
    kill_hits(run, events)
    member_events = [e for e in events if e.info.get("task") != CALLBACK and ".m" in e.id]
    c = classify(member_events)
    run.standard_checks(c, dup_bound=run.bound(KILLS), dead=None)
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


@dataclass
class ChordFigures:
    """What the ledger says about the chords' callbacks (chord keys per figure)."""

    published: list[str] = field(default_factory=list)
    #: Chords with a dead-lettered member: their callback must never run.
    with_dead_member: list[str] = field(default_factory=list)
    #: Callbacks started more than once (killed mid-run: allowed, reported).
    started_more_than_once: list[str] = field(default_factory=list)
    #: Callbacks that ran to the end more than once (must be none).
    completed_more_than_once: list[str] = field(default_factory=list)
    #: Chords whose members all ran but whose callback never completed.
    never_completed: list[str] = field(default_factory=list)
    #: Chords with a dead member whose callback ran anyway.
    after_dead_member: list[str] = field(default_factory=list)
    #: Callbacks that received other values than their members' in header order.
    wrong_values: list[str] = field(default_factory=list)
    #: Callbacks dead-lettered.
    callback_dead: list[str] = field(default_factory=list)
    starts: int = 0
    dones: int = 0
    views: dict[str, CallbackView] = field(default_factory=dict)

    def to_dict(self) -> dict[str, int]:
        """The counts."""
        return {
            "published": len(self.published),
            "with_dead_member": len(self.with_dead_member),
            "callback_started_more_than_once": len(self.started_more_than_once),
            "callback_completed_more_than_once": len(self.completed_more_than_once),
            "callback_never_completed": len(self.never_completed),
            "callback_after_dead_member": len(self.after_dead_member),
            "callback_wrong_values": len(self.wrong_values),
            "callback_dead_lettered": len(self.callback_dead),
            "callback_starts": self.starts,
            "callback_dones": self.dones,
        }


def chord_figures(plans: Sequence[ChordPlan], events: Iterable[Event]) -> ChordFigures:
    """Judge the callbacks of the published chords ``plans`` from the ledger ``events``."""
    views: dict[str, CallbackView] = defaultdict(CallbackView)
    dead_members: set[str] = set()
    dead_callbacks: set[str] = set()
    for e in events:
        task = e.info.get("task")
        if task == CALLBACK and e.kind == "start":
            views[e.id].starts.append(e)
        elif task == CALLBACK and e.kind == "done":
            views[e.id].dones.append(e)
        elif task == CALLBACK and e.kind == "dead":
            dead_callbacks.add(e.id)
        elif task == MEMBER and e.kind == "dead":
            dead_members.add(e.id.rsplit(".m", 1)[0])
    f = ChordFigures(published=[p.key for p in plans])
    for p in plans:
        view = views[p.key]
        f.starts += len(view.starts)
        f.dones += len(view.dones)
        if len(view.starts) > 1:
            f.started_more_than_once.append(p.key)
        if len(view.dones) > 1:
            f.completed_more_than_once.append(p.key)
        if p.key in dead_members:
            f.with_dead_member.append(p.key)
            if view.dones:
                f.after_dead_member.append(p.key)
        elif not view.dones:
            f.never_completed.append(p.key)
        if p.key in dead_callbacks:
            f.callback_dead.append(p.key)
        if any(d.info.get("values") != list(p.values) for d in view.dones):
            f.wrong_values.append(p.key)
    f.views = dict(views)
    return f


def _judge(run: Run, store: StateStore, publisher: ChordPublisher, events: list[Event]) -> None:
    """The chord checks: callback completions, values, ``get()``, the stored results."""
    calls = {c.plan.key: c for c in publisher.calls}
    f = chord_figures([c.plan for c in publisher.calls if c.handle is not None], events)
    dead_members = set(f.with_dead_member)
    whole = [k for k in f.published if k not in dead_members]
    run.extra["chords"] = f.to_dict()

    def evidence(keys: list[str]) -> list[dict[str, Any]]:
        return [_evidence(run, k, calls[k], f.views.get(k, CallbackView())) for k in keys[:SAMPLES]]

    samples = {
        "callback_completed_more_than_once": evidence(f.completed_more_than_once),
        "callback_started_more_than_once": evidence(f.started_more_than_once),
        "callback_never_completed": evidence(f.never_completed),
        "callback_after_dead_member": evidence(f.after_dead_member),
    }
    run.extra["chord_samples"] = {k: v for k, v in samples.items() if v}
    twice, never = f.completed_more_than_once, f.never_completed
    run.check("callback_completed_more_than_once", not twice, len(twice), "0 chords")
    run.check("callback_never_completed", not never, len(never), "0 chords (all members done)")
    run.check(
        "callback_after_dead_member",
        not f.after_dead_member,
        f.after_dead_member[:SAMPLES],
        "none",
    )
    run.check("callback_values_in_order", not f.wrong_values, f.wrong_values[:SAMPLES], "all")
    run.check(
        "chord_publish_failed",
        len(f.published) == len(calls),
        len(calls) - len(f.published),
        "0 chords",
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
    if not store.watching:
        run.notes.append(f"final writes not counted on {store.kind}: {store.watch_error}")
        return
    writes = [store.finals.get(i, 0) for i in ids]
    run.extra["backend_final_writes"] = {str(k): v for k, v in sorted(Counter(writes).items())}
    off = [i for i in ids if store.finals.get(i, 0) != 1]
    run.check("backend_one_final_write", not off, off[:SAMPLES], "1 final write per chord id")
