"""A dependency outage behind a circuit breaker: S20.

The harness publishes N tasks of :data:`~reliability.circuit_tasks.CALL`
(2,000 in release at 50/s; 400 in ci at 40/s), each behind the circuit
:data:`~reliability.circuit_tasks.CIRCUIT` (5 failures in 10 s open it, 2 s
before a probe). A quarter into the publishing, the dependency goes down for
:data:`OUTAGE_S` seconds (20 in release, 8 in ci): the harness creates the
outage file, and every run of the task raises :exc:`ConnectionError` until it
removes it. Two worker processes run the tasks; the circuit's state is in the
Redis result backend (the machine's shared Redis, under a key prefix of the
run's own, removed at the end).

Pass criteria, from the ledger, the dead-letter queue and the workers' logs:

* nothing lost, nothing unexpected, no duplicate, nothing dead-lettered (the
  outage costs no task its retries: tasks wait while the circuit is open);
* every task ran to the end (``executed`` = N);
* the circuit opened (``circuit.opened``, reason ``failures``) within
  :data:`OPEN_WITHIN_S` of the outage's start, and was closed by a probe
  (``circuit.closed``, reason ``probe_succeeded``) within :data:`CLOSE_WITHIN_S`
  of its end; it reads closed at the end;
* few runs failed: at most the threshold, the runs in flight when it opened
  (twice the worker threads), and one per half-open probe: while open, no task ran;
* each probe was the only task run while its circuit was half-open
  (``half_open`` events = probes ended by ``opened``/``closed``, never two in a row).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqtasks.exceptions import MQTasksError
from mqtasks.middleware.circuits import circuit_status

from .app_env import use_app
from .circuit_tasks import CALL, CIRCUIT, FAILURE_THRESHOLD, RESET_TIMEOUT, build_circuit_app
from .events import wait_started
from .harness import Harness
from .ledger import Event, classify
from .profiles import BrokerProfile
from .steps import finish, sleep_until
from .workflows import StateStore
from .workload import Job

if TYPE_CHECKING:
    from .run import Run

__all__ = ["circuit_events", "circuit_figures", "s20"]

#: Worker processes, threads each, and prefetch.
WORKERS = 2
CONCURRENCY = 4
PREFETCH = 8
#: Seconds the dependency is down, and of publishing, by profile.
OUTAGE_S = {"release": 20.0, "ci": 8.0}
PUBLISH_S = {"release": 40.0, "ci": 10.0}
#: Seconds from the outage's start to the circuit's opening, and from its end to the closing.
OPEN_WITHIN_S = 5.0
CLOSE_WITHIN_S = RESET_TIMEOUT + 5.0


def circuit_events(logs_dir: Path) -> list[dict[str, Any]]:
    """The workers' ``circuit.*`` log events, oldest first: ``t`` (epoch), ``event``, ``reason``;
    and the count of ``task.deferred`` lines by reason, as one entry of event ``deferred``."""
    found: list[dict[str, Any]] = []
    deferred: Counter[str] = Counter()
    for path in sorted(logs_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or '"circuit' not in line:
                continue
            with contextlib.suppress(json.JSONDecodeError, KeyError, ValueError):
                data = json.loads(line)
                event = str(data["event"])
                if event == "task.deferred":
                    deferred[str(data.get("reason"))] += 1
                elif event.startswith("circuit."):
                    when = data["timestamp"].replace("Z", "+00:00")
                    found.append(
                        {
                            "t": _epoch(when),
                            "event": event,
                            "reason": data.get("reason"),
                            "file": path.name,
                        }
                    )
    found.sort(key=lambda e: e["t"])
    return [*found, {"event": "deferred", "by_reason": dict(deferred)}]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def circuit_figures(
    events: Sequence[Event], log: Sequence[dict[str, Any]], down_at: float, up_at: float
) -> dict[str, Any]:
    """What the ledger and the logs say of the outage and the circuit.

    Returns:
        ``failed_runs``: runs that started and did not finish (the outage's
        ConnectionErrors); ``failed_during_open``: such runs that started while
        the circuit was open (by the logs: after an ``opened``, before the next
        ``half_open``); ``opened``, ``half_open``, ``closed``: events by reason;
        ``opened_after_s``: from the outage's start to the first ``opened``;
        ``closed_after_s``: from its end to the last ``closed``;
        ``two_probes_in_a_row``: ``half_open`` events followed by another before
        an ``opened`` or ``closed`` (a probe with no outcome); ``deferred``: the
        deferrals by reason; ``max_attempt``: the highest attempt that finished.
    """
    starts: Counter[str] = Counter()
    dones: Counter[str] = Counter()
    start_times: dict[str, list[float]] = {}
    max_attempt = 0
    for e in events:
        if e.kind == "start":
            starts[e.id] += 1
            start_times.setdefault(e.id, []).append(e.t)
        elif e.kind == "done":
            dones[e.id] += 1
            max_attempt = max(max_attempt, e.attempt or 0)
    transitions = [x for x in log if x["event"] != "deferred"]
    deferred: dict[str, int] = next((x["by_reason"] for x in log if x["event"] == "deferred"), {})
    # The open periods: from each "opened" to the next "half_open" or "closed".
    periods: list[tuple[float, float]] = []
    opened: float | None = None
    for x in transitions:
        if x["event"] == "circuit.opened" and opened is None:
            opened = x["t"]
        elif x["event"] in ("circuit.half_open", "circuit.closed") and opened is not None:
            periods.append((opened, x["t"]))
            opened = None
    failed_open = 0
    for task_id, times in start_times.items():
        failed = starts[task_id] - dones[task_id]
        if failed > 0:
            # The failed runs are among its starts; count those inside an open period.
            inside = sum(1 for t in times if any(a < t < b for a, b in periods))
            failed_open += min(failed, inside)
    by: dict[str, Counter[str]] = {"opened": Counter(), "half_open": Counter(), "closed": Counter()}
    for x in transitions:
        kind = x["event"].removeprefix("circuit.")
        if kind in by:
            by[kind][str(x["reason"])] += 1
    first_open = next(
        (x["t"] for x in transitions if x["event"] == "circuit.opened" and x["t"] >= down_at - 1),
        None,
    )
    last_closed = max((x["t"] for x in transitions if x["event"] == "circuit.closed"), default=None)
    in_a_row = 0
    previous = None
    for x in transitions:
        if x["event"] == "circuit.half_open" and previous == "circuit.half_open":
            in_a_row += 1
        previous = x["event"]
    return {
        "failed_runs": sum(starts.values()) - sum(dones.values()),
        "failed_during_open": failed_open,
        "opened": dict(by["opened"]),
        "half_open": sum(by["half_open"].values()),
        "closed": dict(by["closed"]),
        "opened_after_s": None if first_open is None else round(first_open - down_at, 3),
        "closed_after_s": None if last_closed is None else round(last_closed - up_at, 3),
        "two_probes_in_a_row": in_a_row,
        "deferred": deferred,
        "max_attempt": max_attempt,
    }


def s20(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """A dependency down for 20 s (ci 8 s) mid-run behind a circuit: it opens, the tasks
    wait instead of failing, none is dead-lettered, all run once it closes."""
    with h.run("S20", broker, workers=WORKERS, concurrency=CONCURRENCY, prefetch=PREFETCH) as run:
        started = time.time()
        store = StateStore("redis", secrets.token_hex(4))
        store.prefix = f"rel_s20_{secrets.token_hex(4)}_"
        run.extra["backend"] = store.describe()
        outage = run.dir / "outage"
        try:
            return _s20(run, store, outage, started)
        finally:
            outage.unlink(missing_ok=True)
            run.pool.stop(timeout=10)
            try:
                run.extra["backend_removed"] = store.drop()
            except Exception as exc:
                run.extra["backend_removed"] = f"cleanup failed: {type(exc).__name__}: {exc}"


def _s20(run: Run, store: StateStore, outage: Path, started: float) -> dict[str, Any]:
    use_app(
        run,
        "reliability.circuit_tasks",
        build_circuit_app,
        {**store.env(), "RELIABILITY_OUTAGE_FILE": str(outage)},
    )
    try:
        run.app.backend.check()
    except MQTasksError as exc:
        run.check("backend_reachable", False, f"{type(exc).__name__}: {exc}", "a round trip")
        return run.result(classify([]), started=started)
    release = run.profile.name == "release"
    n = 2000 if release else 400
    outage_s = OUTAGE_S["release" if release else "ci"]
    publish_s = PUBLISH_S["release" if release else "ci"]
    jobs = [Job(CALL, (run.new_id(), round(run.rng.uniform(2, 20), 2))) for _ in range(n)]
    run.extra.update(tasks=n, outage_s=outage_s, circuit=CIRCUIT)
    run.pool.start()
    wait_started(run, WORKERS)
    begin = run.rel()
    main = run.start_publisher(jobs, rate=n / publish_s)
    sleep_until(run, begin + publish_s / 4)
    outage.touch()
    down_at = time.time()
    run.fault("dependency outage", duration_s=outage_s)
    time.sleep(outage_s)
    outage.unlink()
    up_at = time.time()
    main.join()
    run.extra["publisher_main"] = main.stats.summary()
    events, c = finish(run, 120.0 + outage_s)
    _judge(run, events, c, n, down_at, up_at)
    return run.result(c, started=started)


def _judge(run: Run, events: list[Event], c: Any, n: int, down_at: float, up_at: float) -> None:
    run.standard_checks(c, dup_bound=0, dead=0)
    run.check("all_executed", c.executed == n, c.executed, str(n))
    log = circuit_events(run.dir / "logs")
    f = circuit_figures(events, log, down_at, up_at)
    run.extra["circuit_figures"] = f
    opened_s = f["opened_after_s"]
    run.check(
        "opened",
        f["opened"].get("failures", 0) >= 1 and opened_s is not None and opened_s <= OPEN_WITHIN_S,
        {"opened": f["opened"], "after_s": opened_s},
        f"opened by failures within {OPEN_WITHIN_S:g} s of the outage",
    )
    closed_s = f["closed_after_s"]
    run.check(
        "closed_by_a_probe",
        f["closed"].get("probe_succeeded", 0) >= 1
        and closed_s is not None
        and 0 <= closed_s <= CLOSE_WITHIN_S,
        {"closed": f["closed"], "after_s": closed_s},
        f"closed by a probe within {CLOSE_WITHIN_S:g} s of the outage's end",
    )
    try:
        state = circuit_status(run.app)[0]["state"]
    except MQTasksError as exc:
        state = f"unreadable: {exc}"
    run.check("closed_at_the_end", state == "closed", state, "closed")
    bound = FAILURE_THRESHOLD + 2 * WORKERS * CONCURRENCY + f["half_open"]
    run.check(
        "few_failed_runs",
        f["failed_runs"] <= bound,
        f["failed_runs"],
        f"<= threshold + 2 x worker threads + probes = {bound}",
    )
    run.check(
        "runs_while_open",
        f["failed_during_open"] <= 2 * WORKERS * CONCURRENCY,
        f["failed_during_open"],
        f"<= {2 * WORKERS * CONCURRENCY} (runs already started when it opened)",
    )
    run.check("one_probe_at_a_time", f["two_probes_in_a_row"] == 0, f["two_probes_in_a_row"], "0")


def main() -> None:
    """Run S20 on the brokers given (``python -m reliability.circuits [ci|release] RQ RD``),
    print one JSON object per run; exit 1 if a check failed."""
    import random
    import sys
    import tempfile

    from .profiles import PROFILES

    args = sys.argv[1:]
    profile = PROFILES[args[0] if args and args[0] in PROFILES else "ci"]
    brokers = [a for a in args if a in ("RQ", "RD")] or ["RQ", "RD"]
    workdir = Path(tempfile.mkdtemp(prefix="mqtasks-rel-s20-"))
    workdir.chmod(0o755)  # the RabbitMQ node runs as another user below it
    harness = Harness(workdir, profile, random.randrange(2**31))
    failed = False
    try:
        for broker in brokers:
            row = s20(harness, broker)  # type: ignore[arg-type]
            print(json.dumps(row, default=str), flush=True)
            failed |= not all(check["ok"] for check in row.get("checks", []))
    finally:
        harness.close()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
