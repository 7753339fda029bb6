"""Periodic tasks under leader faults: S22, three ``mqtasks beat`` processes, one tick a second.

Three ``python -m mqtasks beat -A reliability.periodic_tasks`` processes share
one schedule (:data:`~reliability.periodic_tasks.TICK`, ``every=1``,
``catch_up="all"``) through the result backend, with ``--lease-ttl``
:data:`LEASE_TTL`; two worker processes run the ticks. For :data:`WINDOW_S`
seconds (3 minutes in release, 75 s in ci) the harness finds the leader from
the beats' JSON logs (``periodic.leader`` / ``periodic.follower``) and SIGKILLs
it twice (its slot restarted at once, so three run again), then SIGSTOPs the
next leader for :data:`FREEZE_S` s and SIGCONTs it. Then it stops the beats
(SIGTERM), lets the workers drain, and judges:

* every tick from the first one sent to the last one ran exactly once (the
  ledger: the task body records its run under its task id, the tick id; 0 runs
  is a lost tick, 2 or more a duplicate), and the scheduler kept up to the end;
* every ``periodic.sent`` line beyond the first of a tick says ``resent`` and
  the tick ran once (a new leader may resend a tick an earlier one claimed; the
  workers run a tick id once); a tick that ran with no ``sent`` line is allowed
  only just before a SIGKILL (a killed process loses its last 0.1 s of log lines);
* the longest gap between consecutive ticks' send times is at most the lease TTL
  plus one tick plus :data:`GAP_TOLERANCE_S` (process scheduling and the
  followers' ~1 s retry jitter); a tick's send time is its first ``sent`` line,
  or its first run when that is earlier (or the line was lost);
* fencing: no ``periodic.sent`` line carries a token lower than one already
  used by another process, and the frozen process, once resumed, sends nothing
  until it leads again and logs its stepping down (``periodic.follower``).

Backends: in ci RQ runs with the PostgreSQL backend and RD with the Redis one;
release runs both backends on each broker (one row with the two runs' checks,
prefixed by backend, and their rows under ``runs``). Each run has its own app
name (the lease and claim keys), key or table prefix, and queue, all removed
at the end.

Run it alone: ``python -m reliability --scenario s22 --no-controls [--profile release]``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mqtasks.exceptions import MQTasksError

from .app_env import use_app
from .events import wait_started
from .harness import Harness
from .ledger import Classification, Event, classify
from .periodic_tasks import EVERY, TICK, build_periodic_app
from .profiles import BrokerProfile
from .steps import finish, sleep_until
from .workers import WorkerPool
from .workflows import StateStore

if TYPE_CHECKING:
    from .run import Run

__all__ = ["BeatLine", "periodic_figures", "read_beat_logs", "s22"]

#: Worker processes, threads each, prefetch; scheduler processes.
WORKERS = 2
CONCURRENCY = 2
PREFETCH = 4
BEATS = 3
#: The leader lease's TTL (``mqtasks beat --lease-ttl``), seconds.
LEASE_TTL = 10.0
#: Seconds the harness watches the schedulers, by profile.
WINDOW_S = {"release": 180.0, "ci": 75.0}
#: When the faults fall, as shares of the window: SIGKILL, SIGKILL, SIGSTOP.
FAULT_AT = (0.1, 0.38, 0.62)
#: Seconds the leader stays frozen.
FREEZE_S = 15.0
#: Allowed beyond lease TTL + one tick in the longest gap: process scheduling and
#: the followers' ~1 s retry, on a loaded 2-core machine.
GAP_TOLERANCE_S = 1.0
#: A tick may run with no ``periodic.sent`` line this long before a SIGKILL (the
#: log lines a killed process had not written yet; they are flushed every 0.1 s).
UNLOGGED_BEFORE_KILL_S = 1.5
#: The backend of each broker's ci run; release runs both.
CI_BACKEND = {"RQ": "postgresql", "RD": "redis"}
BACKENDS = ("postgresql", "redis")

_TICK_ID = re.compile(r"^periodic:(?P<name>.+):(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z)$")


def tick_time(tick_id: str) -> float | None:
    """The epoch time of tick id ``periodic:<schedule>:<UTC ISO>``; None if it is not one."""
    m = _TICK_ID.match(tick_id)
    if m is None:
        return None
    return datetime.fromisoformat(m["iso"].replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class BeatLine:
    """One ``periodic.*`` log line of a scheduler process."""

    t: float
    pid: int
    event: str
    tick_id: str | None = None
    token: int | None = None
    resent: bool = False
    reason: str | None = None
    late_ms: float | None = None


def beat_argv(lease_ttl: float) -> list[str]:
    """Command line of one scheduler process."""
    return [
        sys.executable, "-m", "mqtasks", "beat", "-A", "reliability.periodic_tasks",
        "--lease-ttl", f"{lease_ttl:g}", "--log-level", "info",
    ]  # fmt: skip


def read_beat_logs(pool: WorkerPool) -> list[BeatLine]:
    """Every ``periodic.*`` line the pool's processes logged, oldest first.

    The pool names the n-th process it started ``worker-<slot>-<n>.log``; its
    pid is the n-th of :attr:`WorkerPool.started`.
    """
    out: list[BeatLine] = []
    for n, (_t, slot, pid) in enumerate(list(pool.started), start=1):
        path = pool.log_dir / f"worker-{slot}-{n}.log"
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"periodic.' in line:
                    parsed = _parse(line, pid)
                    if parsed is not None:
                        out.append(parsed)
    out.sort(key=lambda x: x.t)
    return out


def _parse(line: str, pid: int) -> BeatLine | None:
    try:
        data = json.loads(line)
        event = str(data["event"])
        t = datetime.fromisoformat(data["timestamp"].replace("Z", "+00:00")).timestamp()
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not event.startswith("periodic."):
        return None
    token = data.get("token")
    late = data.get("late_ms")
    return BeatLine(
        t=t,
        pid=pid,
        event=event,
        tick_id=data.get("tick_id"),
        token=int(token) if isinstance(token, int | float | str) and str(token).isdigit() else None,
        resent=bool(data.get("resent", False)),
        reason=data.get("reason"),
        late_ms=float(late) if isinstance(late, int | float) else None,
    )


def current_leader(lines: Sequence[BeatLine], alive: set[int]) -> tuple[int, float] | None:
    """``(pid, since)`` of the live process that last logged ``periodic.leader`` and has not
    stepped down since; None if none leads by the logs."""
    state: dict[int, tuple[str, float]] = {}
    for x in lines:
        if x.event in ("periodic.leader", "periodic.follower"):
            state[x.pid] = (x.event, x.t)
    leading = [
        (t, pid) for pid, (ev, t) in state.items() if ev == "periodic.leader" and pid in alive
    ]
    if not leading:
        return None
    t, pid = max(leading)
    return pid, t


def periodic_figures(
    lines: Sequence[BeatLine],
    events: Sequence[Event],
    faults: Sequence[dict[str, Any]],
    *,
    stop_at: float,
) -> dict[str, Any]:
    """What the beats' logs and the ledger say of the ticks, the gaps and the faults.

    Args:
        lines: The beats' ``periodic.*`` lines.
        events: The ledger (``start``/``done`` of the tick ids).
        faults: The run's faults: ``kind`` SIGKILL or SIGSTOP, ``pid``, ``at``
            (epoch), and for SIGSTOP ``cont_at``.
        stop_at: When the beats were told to stop (epoch).

    Returns:
        ``ticks_expected`` (every tick from the first to the last one sent or
        run), ``ticks_ran``, ``lost`` (expected ticks that never ran),
        ``duplicates`` (ticks that ran more than once), ``sent_lines``,
        ``resent_lines``, ``bad_repeats`` (ticks with several ``sent`` lines
        not explained by a resend of a tick that ran once), ``unlogged`` and
        ``unlogged_unexplained`` (ticks that ran with no ``sent`` line, and
        those not just before a SIGKILL), ``behind_at_stop_s``,
        ``longest_gap_s`` and where it ended, ``max_late_ms``,
        ``stale_sends``, per-fault ``takeover``, and ``frozen``.
    """
    runs: Counter[str] = Counter()
    first_run: dict[str, float] = {}
    for e in events:
        if e.kind == "done" and tick_time(e.id) is not None:
            runs[e.id] += 1
        if e.kind == "start" and tick_time(e.id) is not None:
            first_run[e.id] = min(e.t, first_run.get(e.id, e.t))
    sent = [x for x in lines if x.event == "periodic.sent" and x.tick_id]
    by_tick: dict[str, list[BeatLine]] = {}
    for x in sent:
        by_tick.setdefault(str(x.tick_id), []).append(x)
    ids = set(runs) | set(by_tick)
    times = {i: tick_time(i) for i in ids}
    name = next((m["name"] for i in ids if (m := _TICK_ID.match(i))), TICK)
    known = sorted(t for t in times.values() if t is not None)
    expected: list[float] = []
    if known:
        k = known[0]
        while k <= known[-1] + 1e-6:
            expected.append(k)
            k += EVERY
    by_time = {round(t, 3): i for i, t in times.items() if t is not None}
    lost = [t for t in expected if runs.get(by_time.get(round(t, 3), ""), 0) == 0]
    dup = sorted(i for i, n in runs.items() if n > 1)
    bad_repeats = sorted(
        i
        for i, xs in by_tick.items()
        if len(xs) > 1 and (sum(1 for x in xs if not x.resent) > 1 or runs.get(i, 0) != 1)
    )
    kills = [f["at"] for f in faults if f["kind"] == "SIGKILL"]
    unlogged = sorted(i for i in runs if i not in by_tick)
    unexplained = [
        i
        for i in unlogged
        if not any(0 <= k - first_run.get(i, 0.0) <= UNLOGGED_BEFORE_KILL_S for k in kills)
    ]
    # Send time of each tick: its first sent line, or its first run if earlier.
    send_at: list[tuple[float, float]] = []
    for t in expected:
        i = by_time.get(round(t, 3))
        if i is None:
            continue
        candidates = [x.t for x in by_tick.get(i, [])]
        if i in first_run:
            candidates.append(first_run[i])
        if candidates:
            send_at.append((t, min(candidates)))
    gap, gap_end = 0.0, None
    for (_, a), (tb, b) in itertools.pairwise(send_at):
        if b - a > gap:
            gap, gap_end = b - a, tb
    stale = _stale_sends(sent)
    return {
        "schedule": name,
        "ticks_expected": len(expected),
        "ticks_ran": sum(1 for t in expected if runs.get(by_time.get(round(t, 3), ""), 0) >= 1),
        "lost": len(lost),
        "lost_sample": [_iso(t) for t in lost[:10]],
        "duplicates": len(dup),
        "duplicate_sample": dup[:10],
        "sent_lines": len(sent),
        "resent_lines": sum(1 for x in sent if x.resent),
        "bad_repeats": len(bad_repeats),
        "bad_repeat_sample": bad_repeats[:10],
        "unlogged": len(unlogged),
        "unlogged_unexplained": unexplained[:10],
        "first_tick": _iso(known[0]) if known else None,
        "last_tick": _iso(known[-1]) if known else None,
        "behind_at_stop_s": round(stop_at - known[-1], 3) if known else None,
        "longest_gap_s": round(gap, 3),
        "longest_gap_ends_at_tick": _iso(gap_end) if gap_end is not None else None,
        "max_late_ms": max((x.late_ms for x in sent if x.late_ms is not None), default=None),
        "stale_sends": len(stale),
        "stale_sample": stale[:10],
        "takeover": [_takeover(lines, f) for f in faults],
        "frozen": _frozen(lines, faults),
        "tokens": sorted({x.token for x in lines if x.token is not None}),
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _stale_sends(sent: Sequence[BeatLine]) -> list[dict[str, Any]]:
    """``sent`` lines whose token is lower than one another process logged a send with before."""
    stale: list[dict[str, Any]] = []
    highest: dict[int, int] = {}  # pid -> highest token it sent with so far
    for x in sent:
        if x.token is not None:
            others = max((tok for pid, tok in highest.items() if pid != x.pid), default=None)
            if others is not None and x.token < others:
                stale.append({"pid": x.pid, "tick_id": x.tick_id, "token": x.token, "max": others})
            highest[x.pid] = max(x.token, highest.get(x.pid, x.token))
    return stale


def _takeover(lines: Sequence[BeatLine], fault: dict[str, Any]) -> dict[str, Any]:
    """Seconds from a fault on the leader to another process's ``periodic.leader``, and
    to its first ``periodic.sent``."""
    at, pid = fault["at"], fault["pid"]
    led = next(
        (x for x in lines if x.t >= at and x.pid != pid and x.event == "periodic.leader"), None
    )
    sent = None
    if led is not None:
        sent = next(
            (x for x in lines if x.t >= led.t and x.pid == led.pid and x.event == "periodic.sent"),
            None,
        )
    return {
        "kind": fault["kind"],
        "leader_after_s": None if led is None else round(led.t - at, 3),
        "first_send_after_s": None if sent is None else round(sent.t - at, 3),
        "new_token": None if led is None else led.token,
    }


def _frozen(lines: Sequence[BeatLine], faults: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """What the frozen process logged once resumed, until it led again (if it did)."""
    stop = next((f for f in faults if f["kind"] == "SIGSTOP"), None)
    if stop is None or "cont_at" not in stop:
        return None
    pid, cont = stop["pid"], stop["cont_at"]
    after = [x for x in lines if x.pid == pid and x.t >= cont - 0.5]
    until = next((x.t for x in after if x.event == "periodic.leader" and x.t >= cont), None)
    window = [x for x in after if until is None or x.t < until]
    follower = next(
        (x for x in window if x.event == "periodic.follower" and x.reason != "stopped"), None
    )
    return {
        "pid": pid,
        "sent_after_resume": [
            {"tick_id": x.tick_id, "token": x.token} for x in window if x.event == "periodic.sent"
        ][:10],
        "stepped_down": None if follower is None else follower.reason,
        "stepped_down_after_s": None if follower is None else round(follower.t - cont, 3),
        "led_again_after_s": None if until is None else round(until - cont, 3),
    }


def s22(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Three schedulers, a tick a second, the leader SIGKILLed twice and frozen 15 s once:
    each tick ran once, the longest gap is within lease + 1 tick, no stale send."""
    release = h.profile.name == "release"
    kinds: list[str] = list(BACKENDS) if release else [CI_BACKEND.get(broker, "redis")]
    if release and broker == "RD":
        kinds.reverse()
    return combine([_one(h, broker, kind) for kind in kinds])


def _one(h: Harness, broker: BrokerProfile, kind: str) -> dict[str, Any]:
    with h.run("S22", broker, workers=WORKERS, concurrency=CONCURRENCY, prefetch=PREFETCH) as run:
        started = time.time()
        tag = secrets.token_hex(4)
        store = StateStore(kind, tag)
        prefix = f"rel_s22_{tag}_"
        store.url, store.prefix = store.url.replace(store.prefix, prefix), prefix
        run.extra["backend"] = store.describe()
        beats = WorkerPool(
            beat_argv(LEASE_TTL),
            {**run.env, **store.env(), "MQTASKS_LOG_FORMAT": "json"},
            BEATS,
            run.dir / "beats",
        )
        try:
            row = _s22(run, store, beats, f"rel-s22-{tag}", started)
        finally:
            beats.stop(timeout=15)
            run.pool.stop(timeout=10)
            with contextlib.suppress(Exception):
                run.app.close()
            try:
                removed: Any = store.drop()
            except Exception as exc:
                removed = f"cleanup failed: {type(exc).__name__}: {exc}"
        row["backend_removed"] = removed
        return row


def _s22(
    run: Run, store: StateStore, beats: WorkerPool, app: str, started: float
) -> dict[str, Any]:
    env = {**store.env(), "RELIABILITY_PERIODIC_APP": app}
    use_app(run, "reliability.periodic_tasks", build_periodic_app, env)
    beats.env.update(env)
    try:
        run.app.backend.check()
    except MQTasksError as exc:
        run.check("backend_reachable", False, f"{type(exc).__name__}: {exc}", "a round trip")
        return run.result(classify([]), started=started)
    window = WINDOW_S["release" if run.profile.name == "release" else "ci"]
    run.extra.update(app=app, beats=BEATS, lease_ttl=LEASE_TTL, window_s=window, every=EVERY)
    run.pool.start()
    wait_started(run, WORKERS)
    beats_at = time.time()
    beats.start()
    first = _wait_leader(beats, None, 60.0)
    begin = run.rel()
    run.extra["first_leader_s"] = None if first is None else round(first[1] - beats_at, 3)
    if first is None:
        run.check("a_leader", False, "no periodic.leader within 60 s", "one")
    else:
        for i, share in enumerate(FAULT_AT):
            sleep_until(run, begin + share * window + run.rng.uniform(-1.0, 1.0))
            _fault(run, beats, freeze=i == len(FAULT_AT) - 1)
    sleep_until(run, begin + window)
    stop_at = time.time()
    codes = beats.stop(timeout=15)
    lines = read_beat_logs(beats)
    # The ledger has runs only: the beats' sent lines stand for the publisher's
    # intent/confirmed, so that the row's sent/confirmed/lost read as elsewhere.
    for x in lines:
        if x.event == "periodic.sent" and x.tick_id:
            run.ledger.record("intent", x.tick_id, t=x.t, beat_pid=x.pid)
            run.ledger.record("confirmed", x.tick_id, t=x.t, beat_pid=x.pid)
    events, c = finish(run, 90.0)
    _judge(run, events, c, lines, beats, stop_at, codes)
    return run.result(c, started=started)


def _wait_leader(
    beats: WorkerPool, not_pid: int | None, timeout: float
) -> tuple[int, float] | None:
    """Wait until a live process other than ``not_pid`` leads (by the logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = current_leader(read_beat_logs(beats), set(beats.pids().values()))
        if found is not None and found[0] != not_pid:
            return found
        time.sleep(0.2)
    return None


def _fault(run: Run, beats: WorkerPool, *, freeze: bool) -> None:
    """SIGKILL the leader (its slot restarts at once), or SIGSTOP it for :data:`FREEZE_S`."""
    previous = next((f["pid"] for f in reversed(run.faults)), None)
    found = _wait_leader(beats, previous, LEASE_TTL + 20.0)
    if found is None:
        run.notes.append("no leader to fault: skipped")
        return
    pid = found[0]
    slot = next((s for s, p in beats.pids().items() if p == pid), None)
    if slot is None:
        run.notes.append(f"leader {pid} gone before its fault: skipped")
        return
    sig = signal.SIGSTOP if freeze else signal.SIGKILL
    beats.signal(sig, slot)
    record = run.fault(
        sig.name, slot=slot, pid=pid, at=time.time(), leader_since_t=run.rel(found[1])
    )
    if freeze:
        time.sleep(FREEZE_S)
        os.kill(pid, signal.SIGCONT)
        record["cont_at"] = time.time()


def _judge(
    run: Run,
    events: list[Event],
    c: Classification,
    lines: list[BeatLine],
    beats: WorkerPool,
    stop_at: float,
    codes: dict[int, int],
) -> None:
    f = periodic_figures(lines, events, run.faults, stop_at=stop_at)
    run.extra["periodic_figures"] = f
    for fault, took in zip(run.faults, f["takeover"], strict=True):
        fault["recovery_s"] = took["first_send_after_s"]  # ticks flowing again
    run.extra["beat_exit_codes_at_stop"] = sorted(codes.values())
    run.extra["beat_exits"] = [
        {"slot": e.slot, "pid": e.pid, "code": e.code, "t": run.rel(e.t)} for e in beats.exits
    ]
    kinds = Counter(x["kind"] for x in run.faults)
    run.check(
        "faults",
        kinds == Counter({"SIGKILL": 2, "SIGSTOP": 1}),
        dict(kinds),
        "2 SIGKILL, 1 SIGSTOP",
    )
    window = run.extra["window_s"]
    run.check(
        "ticks_in_window",
        f["ticks_expected"] >= 0.8 * window,
        f["ticks_expected"],
        f">= {0.8 * window:.0f} (80 % of the window)",
    )
    run.check("every_tick_ran", f["lost"] == 0, f["lost_sample"] or 0, "0 ticks with no run")
    run.check("no_tick_ran_twice", f["duplicates"] == 0, f["duplicate_sample"] or 0, "0")
    run.check("resends_ran_once", f["bad_repeats"] == 0, f["bad_repeat_sample"] or 0, "0")
    run.check(
        "ran_ticks_were_logged",
        not f["unlogged_unexplained"],
        {"unlogged": f["unlogged"], "unexplained": f["unlogged_unexplained"]},
        f"a run with no sent line only within {UNLOGGED_BEFORE_KILL_S:g} s before a SIGKILL",
    )
    behind = f["behind_at_stop_s"]
    run.check(
        "kept_up",
        behind is not None and behind <= EVERY + 1.0,
        behind,
        f"last tick within {EVERY + 1.0:g} s of the stop",
    )
    bound = LEASE_TTL + EVERY + GAP_TOLERANCE_S
    run.check(
        "longest_gap",
        f["longest_gap_s"] <= bound,
        f["longest_gap_s"],
        f"<= lease {LEASE_TTL:g} + 1 tick + {GAP_TOLERANCE_S:g} s tolerance = {bound:g} s",
    )
    run.check("dead_lettered", c.dead_total == 0, c.dead_lettered, "0")
    run.check("no_stale_token_sent", f["stale_sends"] == 0, f["stale_sample"] or 0, "0")
    frozen = f["frozen"]
    run.check(
        "frozen_leader_sent_nothing_stale",
        frozen is not None and not frozen["sent_after_resume"],
        frozen,
        "no sent line from the resumed process until it leads again; "
        "a periodic.follower line after SIGCONT",
    )
    run.check(
        "frozen_leader_stepped_down",
        frozen is not None and frozen["stepped_down"] is not None,
        None if frozen is None else frozen["stepped_down"],
        "periodic.follower (frozen, fenced or lease_lost)",
    )
    takeovers = [t["leader_after_s"] for t in f["takeover"]]
    run.check(
        "takeovers",
        all(t is not None for t in takeovers) and len(takeovers) == len(run.faults),
        takeovers,
        "a new leader after every fault",
    )
    killed = {x["pid"] for x in run.faults if x["kind"] == "SIGKILL"}
    crashed = [
        {"pid": e.pid, "code": e.code, "t": run.rel(e.t)}
        for e in beats.exits
        if e.pid not in killed
    ]
    run.check("no_beat_exit_but_the_kills", not crashed, crashed, "none (the 2 SIGKILLs only)")
    run.check(
        "beats_exit_0_on_sigterm",
        bool(codes) and all(code == 0 for code in codes.values()),
        sorted(codes.values()),
        "0 each",
    )


#: Figures summed over a combined row's runs.
_SUMMED = (
    "sent", "confirmed", "publish_failed", "executed", "executed_more_than_once",
    "started_more_than_once", "lost", "recovered", "unexpected", "done_and_dead",
    "starts", "dones", "duration_s",
)  # fmt: skip


def combine(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for the runs of one broker on several backends (the row itself if one):
    figures summed, checks prefixed by backend, each run's row under ``runs``."""
    if len(rows) == 1:
        return rows[0]
    kinds = [str((r.get("backend") or {}).get("kind")) for r in rows]
    out: dict[str, Any] = {k: rows[0].get(k) for k in ("scenario", "broker", "profile", "seed")}
    for key in _SUMMED:
        out[key] = round(sum(r.get(key) or 0 for r in rows), 1)
    dead: Counter[str] = Counter()
    for r in rows:
        dead.update(r.get("dead_lettered") or {})
    out["dead_lettered"] = dict(dead)
    out["faults"] = [
        {**x, "backend": k} for k, r in zip(kinds, rows, strict=True) for x in r["faults"]
    ]
    out["checks"] = [
        {**ch, "check": f"{k}:{ch['check']}"}
        for k, r in zip(kinds, rows, strict=True)
        for ch in r["checks"]
    ]
    out["passed"] = all(bool(r.get("passed")) for r in rows)
    out["backend"] = "+".join(kinds)
    out["runs"] = dict(zip(kinds, rows, strict=True))
    return out
