"""The negative controls N1-N3 and the scenarios S0-S15 of the fault-injection protocol.

Each scenario function takes the :class:`~reliability.harness.Harness` and a
broker profile and returns one JSON-able result per run, with its figures,
faults and pass checks. A scenario the harness does not implement (yet) is
reported as ``not_implemented``, never as passed.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .harness import BrokerProfile, Harness, Job, Publisher, Run
from .ledger import Checks, Classification, Event, LedgerWriter, classify, percentile

__all__ = ["SCENARIOS", "Scenario"]

ScenarioFn = Callable[[Harness, BrokerProfile], dict[str, Any]]

#: W-mix mean task time, seconds (for run-time estimates only).
WMIX_MEAN_S = 0.031


@dataclass(frozen=True)
class Scenario:
    """A scenario and the broker profiles it runs on."""

    name: str
    title: str
    brokers: tuple[BrokerProfile, ...]
    fn: ScenarioFn | None
    #: Negative control: passes only if it shows loss.
    negative: bool = False


def _finish(run: Run, timeout: float) -> tuple[list[Event], Classification]:
    ok = run.wait_quiescent(timeout)
    run.check("quiescent", ok, ok, f"within {timeout:.0f} s")
    dead = run.drain_dead_letters()
    run.extra["dlq_entries"] = dead
    events = run.events()
    return events, classify(events)


def _wmix_timeout(run: Run, n: int, extra: float = 0.0) -> float:
    return max(120.0, 4 * n * WMIX_MEAN_S / run.workers + 60 + extra)


def _throughput(events: list[Event]) -> float | None:
    intents = [e.t for e in events if e.kind == "intent"]
    dones = [e.t for e in events if e.kind == "done"]
    if not intents or not dones:
        return None
    span = max(dones) - min(intents)
    return round(len({e.id for e in events if e.kind == "done"}) / span, 1) if span > 0 else None


def _sleep_until(run: Run, rel_t: float) -> None:
    delay = run.t0 + rel_t - time.time()
    if delay > 0:
        time.sleep(delay)


def _kill_instants(
    run: Run, count: int, start: float, end: float, min_gap: float = 1.5
) -> list[float]:
    """``count`` uniformly random instants in [start, end], at least ``min_gap`` apart."""
    end = max(end, start + count * min_gap * 1.5)
    for _ in range(1000):
        ts = sorted(run.rng.uniform(start, end) for _ in range(count))
        if all(b - a >= min_gap for a, b in itertools.pairwise(ts)):
            return ts
    return [start + i * min_gap for i in range(count)]


# -- negative controls -------------------------------------------------------------


def n1(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Confirms off, transient messages, kill -9 of RabbitMQ mid-publish: must lose."""
    with h.run("N1", broker, queue_type="classic") as run:
        started = time.time()
        n = h.profile.n(10000)
        stop = threading.Event()
        progress = {"n": 0}
        half = threading.Event()

        def on_progress(i: int) -> None:
            progress["n"] = i
            if i >= n // 2:
                half.set()

        pub = threading.Thread(
            target=run.publish_raw_unconfirmed,
            args=(n,),
            kwargs={"stop": stop, "progress": on_progress},
        )
        pub.start()
        while not half.wait(0.1) and pub.is_alive():
            pass
        node = h.rabbit_node()
        f = run.fault("kill -9 rabbitmq", published_before=progress["n"])
        node.kill()
        pub.join(30)
        stop.set()
        f["restart_s"] = round(node.restart(), 1)
        run.pool.start()
        _, c = _finish(run, _wmix_timeout(run, n))
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)


def n2(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis without persistence, SHUTDOWN NOSAVE before consumption: must lose."""
    with h.run("N2", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        run.publish_all(run.wmix_jobs(n, noop=True))
        server = h.redis_server("RV")
        run.fault("SHUTDOWN NOSAVE + restart")
        server.shutdown_nosave()
        server.restart()
        run.pool.start()
        _, c = _finish(run, 120)
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)


def n3(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Early ack (test-only worker), SIGKILL a worker 5 times: must lose."""
    with h.run("N3", broker, early_ack=True) as run:
        started = time.time()
        n = h.profile.n(10000)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=200)
        est = n * WMIX_MEAN_S / run.workers
        for t in _kill_instants(run, 5, 2.0, max(10.0, 0.7 * est)):
            _sleep_until(run, t)
            run.kill_worker(signal.SIGKILL)
        _, c = _finish(run, _wmix_timeout(run, n))
        run.check("harness_detects_loss", c.lost > 0, c.lost, "> 0 (negative control)")
        return run.result(c, started=started)


# -- scenarios ----------------------------------------------------------------------


def s0(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Baseline: W-mix, no faults."""
    with h.run("S0", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=None)
        events, c = _finish(run, _wmix_timeout(run, n))
        run.standard_checks(c)
        run.check("executed_all", c.executed == n, c.executed, str(n))
        run.extra["throughput_per_s"] = _throughput(events)
        return run.result(c, started=started)


def s1(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Worker SIGKILL mid-task, 5 times, publishing at 200/s."""
    with h.run("S1", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=200)
        est = n * WMIX_MEAN_S / run.workers
        for t in _kill_instants(run, 5, 2.0, max(10.0, 0.8 * est)):
            _sleep_until(run, t)
            run.kill_worker(signal.SIGKILL)
        events, c = _finish(run, _wmix_timeout(run, n, 60))
        run.worker_recovery(events)
        run.standard_checks(c, dup_bound=run.bound(5))
        limit = 40.0 if run.is_redis else 5.0
        worst = [f.get("recovery_s") for f in run.faults]
        run.check(
            "recovery_s",
            all(w is not None and w <= limit for w in worst),
            worst,
            f"<= {limit:.0f} s per kill",
        )
        restarts = [e for e in run.pool.exits if e.restarted_at is not None]
        run.check(
            "supervisor_restart_s",
            all(e.restarted_at is not None and e.restarted_at - e.t <= 1.0 for e in restarts),
            len(restarts),
            "each killed worker replaced within 1 s",
        )
        return run.result(c, started=started)


def s2(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """SIGTERM drains: no duplicates, clean exit 0."""
    drain = 30.0
    with h.run("S2", broker, shutdown_timeout=drain) as run:
        started = time.time()
        n = h.profile.n(2000)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher([Job("rel.work", (run.new_id(), 200.0)) for _ in range(n)], rate=None)
        est = n * 0.2 / run.workers
        for t in _kill_instants(run, 3, 2.0, max(12.0, 0.7 * est), min_gap=3.0):
            _sleep_until(run, t)
            # A worker that is draining: a replacement started by the previous
            # kill may still be importing its app on a loaded machine.
            f = run.kill_worker(signal.SIGTERM, busy=True)
            e = run.pool.wait_exit(f["pid"], drain + 10)
            f["exit_code"] = e.code if e else None
            f["exit_after_s"] = round(e.t - f["at"], 2) if e else None
        events, c = _finish(run, max(120.0, 3 * est + 60))
        run.standard_checks(c)
        run.check(
            "started_more_than_once", c.started_more_than_once == 0, c.started_more_than_once, "0"
        )
        for f in run.faults:
            late = [
                e for e in events if e.pid == f["pid"] and e.kind == "start" and e.t > f["at"] + 1.0
            ]
            f["starts_after_1s"] = len(late)
        run.check(
            "clean_exit",
            all(
                f.get("exit_code") == 0 and (f.get("exit_after_s") or 1e9) <= drain
                for f in run.faults
            ),
            [(f.get("exit_code"), f.get("exit_after_s")) for f in run.faults],
            f"exit 0 within {drain:.0f} s",
        )
        run.check(
            "stops_taking_within_1s",
            all(f["starts_after_1s"] == 0 for f in run.faults),
            [f["starts_after_1s"] for f in run.faults],
            "no start > 1 s after SIGTERM",
        )
        return run.result(c, started=started)


def s2b(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """A task longer than the drain timeout: exit non-zero, no ack, run again, not lost."""
    drain = 5.0
    task_s = 120.0 if h.profile.name == "release" else 20.0
    with h.run("S2b", broker, workers=1, shutdown_timeout=drain) as run:
        started = time.time()
        run.pool.start()
        time.sleep(1.5)
        task_id = run.new_id()
        run.publish_all([Job("rel.work", (task_id, task_s * 1000))])
        deadline = time.time() + 30
        while time.time() < deadline and not any(e.kind == "start" for e in run.events()):
            time.sleep(0.2)
        time.sleep(1.0)
        f = run.kill_worker(signal.SIGTERM)
        e = run.pool.wait_exit(f["pid"], drain + 10)
        f["exit_code"] = e.code if e else None
        f["exit_after_s"] = round(e.t - f["at"], 2) if e else None
        _, c = _finish(run, task_s + 120)
        run.standard_checks(c)
        run.check("exit_nonzero", bool(e and e.code != 0), f["exit_code"], "non-zero")
        run.check(
            "exit_after_drain",
            bool(e and drain - 0.5 <= e.t - f["at"] <= drain + 3),
            f["exit_after_s"],
            f"about {drain:.0f} s",
        )
        run.check("started_twice", c.started_more_than_once == 1, c.started_more_than_once, "1")
        run.check(
            "executed_once", c.executed == 1 and c.executed_more_than_once == 0, c.executed, "1"
        )
        return run.result(c, started=started)


def _broker_restart_run(
    h: Harness,
    broker: BrokerProfile,
    scenario: str,
    faults: list[tuple[str, Callable[[Run], float]]],
) -> dict[str, Any]:
    """Publish throughout while ``faults`` hit the broker ``gap`` seconds apart."""
    gap = 60.0 if h.profile.name == "release" else 20.0
    first = 10.0 if h.profile.name == "release" else 5.0
    with h.run(scenario, broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        span = first + gap * (len(faults) - 1) + 20
        rate = min(200.0, n / span)
        run.extra["publish_rate"] = round(rate, 1)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)
        for i, (kind, inject) in enumerate(faults):
            _sleep_until(run, first + i * gap)
            f = run.fault(kind, at=time.time())
            down_s = inject(run)
            f["back_at"] = time.time()
            f["outage_s"] = round(f["back_at"] - f["at"], 1)
            f["restart_s"] = round(down_s, 1)
        events, c = _finish(run, _wmix_timeout(run, n, 120))
        for f in run.faults:
            f["recovery_s"] = run.first_done_after(events, f["back_at"])
            confirms = [e.t for e in events if e.kind == "confirmed" and e.t >= f["back_at"]]
            f["publisher_recovery_s"] = round(min(confirms) - f["back_at"], 3) if confirms else None
        return _restart_checks(run, c, len(faults), started)


def _restart_checks(run: Run, c: Classification, faults: int, started: float) -> dict[str, Any]:
    run.standard_checks(
        c, dup_bound=run.bound(faults, processes_hit=run.workers), publish_failed=None
    )
    rec = [f.get("recovery_s") for f in run.faults]
    run.check(
        "worker_reconnect_s",
        all(r is not None and r <= 15 for r in rec),
        rec,
        "<= 15 s after the broker is back",
    )
    pub = [f.get("publisher_recovery_s") for f in run.faults]
    run.check(
        "publisher_reconnect_s",
        all(p is None or p <= 15 for p in pub),
        pub,
        "<= 15 s after the broker is back (None: publishing had ended)",
    )
    if run.publisher is not None:
        worst = max(run.publisher.stats.latencies, default=0.0)
        run.check(
            "delay_bounded", worst <= 10.0 + 1.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
    return run.result(c, started=started)


def _rabbit_graceful(run: Run) -> float:
    node = run.harness.rabbit_node()
    node.stop_app()
    time.sleep(5)
    t = time.monotonic()
    node.start_app()
    return time.monotonic() - t


def _rabbit_kill(run: Run) -> float:
    node = run.harness.rabbit_node()
    node.kill()
    return node.restart()


def s3(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """RabbitMQ restart: graceful stop_app/start_app, then kill -9 and restart."""
    return _broker_restart_run(
        h,
        broker,
        "S3",
        [("rabbitmqctl stop_app/start_app", _rabbit_graceful), ("kill -9 rabbitmq", _rabbit_kill)],
    )


def _redis_restart(run: Run) -> float:
    server = run.harness.redis_server(run.broker)  # type: ignore[arg-type]
    server.shutdown_nosave()
    time.sleep(5)
    return server.restart()


def s4(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis restart twice (SHUTDOWN NOSAVE, restart after 5 s); RD must not lose, RV is reported."""
    if broker == "RD":
        return _broker_restart_run(
            h,
            broker,
            "S4",
            [("SHUTDOWN NOSAVE", _redis_restart), ("SHUTDOWN NOSAVE", _redis_restart)],
        )
    # RV: loss is expected and only reported; the start-up warning is the criterion.
    gap = 60.0 if h.profile.name == "release" else 20.0
    with h.run("S4", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        rate = min(200.0, n / (5 + gap + 20))
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)
        for i in range(2):
            _sleep_until(run, 5 + i * gap)
            f = run.fault("SHUTDOWN NOSAVE", at=time.time())
            f["restart_s"] = round(_redis_restart(run), 1)
            f["back_at"] = time.time()
        _, c = _finish(run, _wmix_timeout(run, n, 120))
        warned = run.log_count("broker.unsafe_config")
        run.check("startup_warning_logged", warned > 0, warned, "> 0 'broker.unsafe_config' lines")
        run.extra["lost_reported"] = c.lost
        return run.result(c, started=started)


def _drop_connections(run: Run) -> int:
    """Close every client connection from the broker side (the harness's broker only)."""
    if run.is_redis:
        client = run.harness.redis_server(run.broker).client()  # type: ignore[arg-type]
        try:
            return int(client.client_kill_filter(_type="normal", skipme=True))
        finally:
            client.close()
    return run.harness.rabbit_node().close_connections("chaos")


#: Log events by which a worker shows it noticed the broker is unreachable: a lost
#: connection, or a reconnect attempt that timed out (a worker between connections).
_UNREACHABLE_EVENTS = (
    "broker.connection_lost",
    "broker.heartbeat_missed",
    "broker.reconnect_failed",
)


def _ctl_seconds(run: Run) -> float:
    """How long one rabbitmqctl call to the harness's node takes now (0 on Redis)."""
    if run.is_redis:
        return 0.0
    node = run.harness.rabbit_node()
    t = time.monotonic()
    node.ctl("list_connections", "-q", "--no-table-headers", "name", timeout=30)
    return time.monotonic() - t


def _detections(run: Run, since: float, until: float) -> dict[str, float | None]:
    """Per worker log: seconds from ``since`` to its first sign of an unreachable broker before ``until``."""
    found: dict[str, float | None] = {}
    for t, _event, name in run.log_events(_UNREACHABLE_EVENTS):
        if since <= t <= until and name not in found:
            found[name] = round(t - since, 2)
    return found


def s5(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Connection drops from the broker side, RSTs and a black hole through a proxy."""
    release = h.profile.name == "release"
    gap = 20.0 if release else 5.0
    hole = 45.0 if release else 30.0
    with h.run("S5", broker, proxy=True) as run:
        assert run.proxy is not None
        started = time.time()
        n = h.profile.n(10000)
        # The publisher must still be sending when the black hole ends (resuming is
        # judged on tasks that run after it), and a broker-side close costs two
        # rabbitmqctl calls: 0.5 s each on a quiet machine, several seconds on a
        # loaded one, counted twice over for their spread.
        close_s = 2 * 2 * _ctl_seconds(run)
        span = 2 + 5 * (gap + close_s) + 3 * gap + hole + 20
        run.extra["ctl_s"] = round(close_s / 4, 2)
        rate = min(200.0, n / span)
        run.extra["publish_rate"] = round(rate, 1)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)
        # Each fault comes ``gap`` seconds after the previous one is done, not on a
        # fixed clock: closing connections goes through rabbitmqctl, which took
        # 4 to 9 s against the harness's node on a loaded machine, and a fixed clock fell
        # behind and fired the RSTs and the black hole in the same instant, while
        # every worker was still reconnecting from the previous fault.
        t = 2.0
        for _ in range(5):
            _sleep_until(run, t)
            f = run.fault("close connections (broker side)", at=time.time())
            f["closed"] = _drop_connections(run)
            t = time.time() - run.t0 + gap
        for _ in range(3):
            _sleep_until(run, t)
            f = run.fault("proxy RST", at=time.time())
            f["cut"] = run.proxy.cut()
            t = time.time() - run.t0 + gap
        _sleep_until(run, t)
        f = run.fault("black hole", at=time.time(), seconds=hole)
        run.proxy.blackhole(True)
        time.sleep(hole)
        f["reset_after"] = run.proxy.blackhole(False)
        f["back_at"] = time.time()
        events, c = _finish(run, _wmix_timeout(run, n, 120))
        f["detected_after_s"] = _detections(run, f["at"], f["back_at"])
        lost_events = run.log_events(("broker.connection_lost", "broker.heartbeat_missed"))
        for drop in run.faults[:-1]:
            drop["workers_noticed"] = len(
                {name for t, _e, name in lost_events if drop["at"] <= t < drop["at"] + gap}
            )
        f["recovery_s"] = run.first_done_after(events, f["back_at"])
        hole_calls = [
            lat
            for (ts, lat) in (run.publisher.stats.slow if run.publisher else [])
            if ts >= f["at"]
        ]
        run.standard_checks(
            c, dup_bound=run.bound(5 + 3 + 1, processes_hit=run.workers), publish_failed=None
        )
        detected = list(f["detected_after_s"].values())
        live = len(run.pool.pids())
        run.check(
            "black_hole_detected_s",
            len(detected) >= live and all(d is not None and d <= 25 for d in detected),
            f["detected_after_s"],
            "every worker <= 25 s (2 x heartbeat + 5 s)",
        )
        worst = max(run.publisher.stats.latencies, default=0.0) if run.publisher else 0.0
        run.check(
            "delay_bounded", worst <= 11.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
        run.extra["slow_publishes_in_hole"] = len(hole_calls)
        run.check(
            "worker_resumes_s",
            f["recovery_s"] is not None and f["recovery_s"] <= 15,
            f["recovery_s"],
            "<= 15 s after the black hole ends",
        )
        return run.result(c, started=started)


def s6(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Broker frozen (SIGSTOP): delay() bounded by its timeout, workers resume after SIGCONT."""
    freeze = 45.0 if h.profile.name == "release" else 30.0
    with h.run("S6", broker) as run:
        started = time.time()
        n = h.profile.n(2000)
        rate = min(200.0, n / (5 + freeze + 10))
        run.extra["publish_rate"] = round(rate, 1)
        run.pool.start()
        time.sleep(1.5)
        run.start_publisher(run.wmix_jobs(n), rate=rate)
        _sleep_until(run, 5)
        target = h.rabbit_node() if not run.is_redis else h.redis_server(broker)  # type: ignore[arg-type]
        f = run.fault("SIGSTOP broker", at=time.time(), seconds=freeze)
        target.freeze()
        try:
            time.sleep(freeze)
        finally:
            target.thaw()
        f["back_at"] = time.time()
        events, c = _finish(run, _wmix_timeout(run, n, 120))
        f["recovery_s"] = run.first_done_after(events, f["back_at"])
        run.standard_checks(
            c, dup_bound=run.bound(1, processes_hit=run.workers), publish_failed=None
        )
        stats = run.publisher.stats if run.publisher else None
        worst = max(stats.latencies, default=0.0) if stats else 0.0
        run.extra["max_delay_s"] = round(worst, 2)
        run.check(
            "delay_bounded", worst <= 11.0, round(worst, 2), "<= publish_timeout (10 s) + 1 s"
        )
        run.check(
            "worker_resumes_s",
            f["recovery_s"] is not None and f["recovery_s"] <= 15,
            f["recovery_s"],
            "<= 15 s after SIGCONT",
        )
        return run.result(c, started=started)


def _starts_by_id(events: list[Event], task: str | None = None) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.kind == "start" and (task is None or e.info.get("task") == task):
            out.setdefault(e.id, []).append(e)
    return out


def _dead_by_id(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.kind == "dead":
            out.setdefault(e.id, []).append(e)
    return out


def s8(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """A task that always fails: exactly max_retries + 1 attempts, then the DLQ, on schedule."""
    with h.run("S8", broker) as run:
        started = time.time()
        n = h.profile.n(100, minimum=10)
        run.pool.start()
        time.sleep(1.5)
        # 20 tasks/s: S8 checks the schedule the broker holds. Sent at once, the
        # release profile's 100 x 4 attempts (each publishing its retry, confirmed)
        # queue behind each other on two single-threaded workers for up to 2.6 s on
        # RabbitMQ, and the gaps measured would be that backlog, not the delays.
        run.start_publisher([Job("rel.fail", (run.new_id(),)) for _ in range(n)], rate=20)
        events, c = _finish(run, 120)
        s8_checks(run, events, c, n, run.queue)
        return run.result(c, started=started)


def s8_checks(checks: Checks, events: list[Event], c: Classification, n: int, queue: str) -> None:
    """S8's criteria: exactly 4 starts per id, one DLQ entry with the reason,
    attempts, exception, traceback and queue, on the 0.2, 0.4, 0.8 s schedule."""
    checks.standard_checks(c, dead=n)
    starts = _starts_by_id(events)
    dead = _dead_by_id(events)
    counts = sorted({len(v) for v in starts.values()})
    checks.check("starts_per_id", counts == [4], counts, "exactly 4 (max_retries + 1)")
    reasons = sorted({d.info.get("reason") for v in dead.values() for d in v}, key=str)
    checks.check(
        "dead_reason", reasons == ["max_retries_exceeded"], reasons, "max_retries_exceeded"
    )
    attempts = sorted({d.attempt for v in dead.values() for d in v}, key=str)
    checks.check("dead_attempts_header", attempts == [4], attempts, "4")
    exc = sorted({str(d.info.get("exception", "")).split(":")[0] for v in dead.values() for d in v})
    checks.check("dead_exception_type", exc == ["RuntimeError"], exc, "RuntimeError")
    tb = [d.info.get("traceback_bytes") or 0 for v in dead.values() for d in v]
    checks.check(
        "dead_traceback",
        bool(tb) and all(0 < b <= 8192 for b in tb),
        max(tb, default=0),
        "0 < bytes <= 8 KiB",
    )
    queues = sorted({str(d.info.get("queue")) for v in dead.values() for d in v})
    checks.check("dead_original_queue", queues == [queue], queues, queue)
    checks.check("dead_duplicates", c.dead_duplicates == 0, c.dead_duplicates, "0")
    bad_gaps = []
    worst = 0.0
    for task_id, ss in starts.items():
        ts = sorted(e.t for e in ss)
        for i, (a, b) in enumerate(itertools.pairwise(ts)):
            want = 0.2 * 2**i
            gap = b - a
            worst = max(worst, gap / want)
            if not want <= gap <= want * 1.2 + 0.1:
                bad_gaps.append((task_id, i + 1, round(gap, 3), want))
    checks.extra["worst_gap_ratio"] = round(worst, 2)
    checks.check(
        "retry_schedule",
        not bad_gaps,
        bad_gaps[:10],
        "0.2, 0.4, 0.8 s, each +20 % + 100 ms, never shorter",
    )


def _pending_delivery_limit(run: Run) -> str | None:
    """Why this broker cannot take a delivery limit yet, or None if it can."""
    from mqtasks.exceptions import ConfigurationError

    try:
        run.app.declare([run.queue])
    except ConfigurationError as exc:
        return str(exc)
    return None


def s8b(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Crash loop: tasks that SIGKILL their worker end in the DLQ after limit + 1 deliveries."""
    results = []
    for prefetch in (4, 1):
        with h.run("S8b", broker, delivery_limit=3, prefetch=prefetch) as run:
            started = time.time()
            why = _pending_delivery_limit(run)
            if why is not None:
                return {
                    "scenario": "S8b",
                    "broker": broker,
                    "status": "pending",
                    "passed": None,
                    "reason": f"delivery limits not available on this broker yet: {why}",
                }
            n = h.profile.n(20, minimum=5)
            innocent = h.profile.n(1000, minimum=200)
            run.extra["prefetch"] = prefetch
            run.pool.start()
            time.sleep(1.5)
            jobs = [Job("rel.work", (run.new_id(), 0.0)) for _ in range(innocent)]
            crash_ids: set[str] = set()
            for _ in range(n):
                crash_ids.add(task_id := run.new_id())
                jobs.insert(run.rng.randrange(len(jobs)), Job("rel.crash", (task_id,)))
            run.start_publisher(jobs, rate=50)
            events, c = _finish(run, 300)
            starts = _starts_by_id(events)
            dead = _dead_by_id(events)
            per_crash = sorted({len(starts.get(i, [])) for i in crash_ids})
            run.extra["runs_per_crash_id"] = per_crash
            run.extra["dead_detail"] = sorted(
                {str(dead[i][0].info.get("detail"))[:60] for i in crash_ids if i in dead}
            )
            ran = sum(1 for i in crash_ids if i in starts)
            run.extra["crash_ids_run"] = ran
            if prefetch == 1:
                # With prefetch 4 a crash id can use up its deliveries prefetched
                # beside other crashing tasks without running once: reported above.
                run.check("crash_ids_run", ran == n, ran, str(n))
                # Limit 3: three deliveries run (and kill the worker); the fourth is
                # dead-lettered unrun. With prefetch 4, a crash also charges a delivery
                # to the messages prefetched beside it, so fewer runs are expected there.
                run.check(
                    "runs_per_crash_id",
                    per_crash == [3],
                    per_crash,
                    "exactly 3 runs, 4th delivery dead-lettered",
                )
            crash_reasons = sorted(
                {str(dead[i][0].info.get("reason")) for i in crash_ids if i in dead}
            )
            run.check(
                "crash_ids_dead_lettered",
                all(i in dead for i in crash_ids) and crash_reasons == ["delivery_limit"],
                crash_reasons,
                "every crash id, reason delivery_limit",
            )
            innocents_dead = sum(1 for i in dead if i not in crash_ids)
            run.extra["innocent_dead_lettered"] = innocents_dead
            if prefetch == 1:
                run.check(
                    "innocent_dead_lettered",
                    innocents_dead == 0,
                    innocents_dead,
                    "0 with prefetch 1",
                )
            run.standard_checks(c, dup_bound=None, dead=None)
            results.append(run.result(c, started=started))
    merged = results[0]
    merged["prefetch_1"] = {
        k: results[1].get(k)
        for k in ("passed", "checks", "innocent_dead_lettered", "lost", "dead_lettered")
    }
    merged["passed"] = bool(results[0]["passed"] and results[1]["passed"])
    return merged


def s10(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Expiry shorter than the retry schedule: DLQ 'expired' after 3 attempts, no late start."""
    with h.run("S10", broker) as run:
        started = time.time()
        n = h.profile.n(100, minimum=10)
        run.pool.start()
        time.sleep(1.5)
        run.publish_all([Job("rel.expiring", (run.new_id(),), {"expires": 10.0}) for _ in range(n)])
        events, c = _finish(run, 120)
        run.standard_checks(c, dead=n)
        intents = {e.id: e.t for e in events if e.kind == "intent"}
        starts = _starts_by_id(events)
        late = [i for i, ss in starts.items() if max(e.t for e in ss) > intents[i] + 10.0]
        run.check("no_start_after_expiry", not late, len(late), "0")
        counts = sorted({len(v) for v in starts.values()})
        run.check("attempts_per_id", counts == [3], counts, "3 (t = 0, 2, 6 s)")
        reasons = sorted(c.dead_lettered)
        run.check("dead_reason", reasons == ["expired"], reasons, "expired")
        return run.result(c, started=started)


def s10c(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Redis: countdowns longer than the liveness/visibility window run once."""
    countdown = 60.0
    with h.run("S10c", broker) as run:
        started = time.time()
        n = h.profile.n(1000)
        run.pool.start()
        time.sleep(1.5)
        run.publish_all(
            [Job("rel.work", (run.new_id(), 1.0), {"countdown": countdown}) for _ in range(n)]
        )
        events, c = _finish(run, countdown + 120)
        run.standard_checks(c)
        intents = {e.id: e.t for e in events if e.kind == "intent"}
        early = [
            i
            for i, ss in _starts_by_id(events).items()
            if min(e.t for e in ss) < intents[i] + countdown
        ]
        run.check("not_before_countdown", not early, len(early), "0 started before the countdown")
        return run.result(c, started=started)


def _slope_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, value) pairs, per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in samples) / den * 60


#: Publisher threads of S12, for T_max and for the soak (each its share of the rate).
S12_PUBLISHERS = 4


def _start_publishers(run: Run, jobs: list[Job], rate: float | None, name: str) -> list[Publisher]:
    """Publish ``jobs`` from S12_PUBLISHERS threads, each with a ledger of its own."""
    pubs = []
    for i in range(S12_PUBLISHERS):
        ledger = LedgerWriter(run.ledger_dir / f"publisher-{name}-{i}.jsonl")
        pub = Publisher(run.app, ledger, rate / S12_PUBLISHERS if rate else None)
        pub.start(jobs[i::S12_PUBLISHERS])
        pubs.append(pub)
    return pubs


def s12(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Soak: W-noop at 0.7 x T_max; flat RSS, bounded depth, nothing lost."""
    from .workers import proc_stats

    with h.run("S12", broker) as run:
        started = time.time()
        run.pool.start()
        time.sleep(1.5)
        # T_max: W-noop end to end, with confirms, from S12_PUBLISHERS threads. One
        # thread waits, per task, for a confirm and for the ledger's two fsyncs: it
        # measures the disk's latency more than mqtasks' throughput.
        n = h.profile.n(10000, minimum=2000)
        pubs = _start_publishers(run, run.wmix_jobs(n, noop=True), None, "tmax")
        for pub in pubs:
            pub.join()
        t_pub = max(sum(pub.stats.latencies) for pub in pubs)
        ok = run.wait_quiescent(120, quiet=2.0)
        events = run.events()
        t_max = _throughput(events) or 1.0
        run.extra["t_max_per_s"] = t_max
        run.extra["t_max_publish_only_per_s"] = round(n / t_pub, 1) if t_pub else None
        target = 0.7 * t_max
        soak = h.profile.soak_s
        count = int(target * soak)
        run.extra["soak"] = {"target_per_s": round(target, 1), "seconds": soak, "tasks": count}
        soak_t0 = time.time()
        pubs = _start_publishers(run, run.wmix_jobs(count, noop=True), target, "soak")
        run.publisher = pubs[0]  # its error texts are searched for the password
        samples: list[dict[str, Any]] = []
        me = os.getpid()
        while any(pub.alive for pub in pubs):
            time.sleep(1.0)
            row: dict[str, Any] = {
                "t": round(time.time() - soak_t0, 1),
                "workers": run.pool.stats(),
            }
            row["harness"] = proc_stats(me)
            try:
                row["depth"] = run.depths()["ready"] if run.is_redis else None
            except Exception:
                row["depth"] = None
            samples.append(row)
        achieved = count / max(1e-9, time.time() - soak_t0)
        events, c = _finish(run, 300)
        run.extra["soak"]["achieved_per_s"] = round(achieved, 1)
        run.check(
            "publish_rate",
            achieved >= 0.95 * target,
            round(achieved, 1),
            f">= 95 % of {target:.0f}/s",
        )
        run.standard_checks(c)
        run.check("quiescent_after_t_max", ok, ok, "T_max batch drained")
        floor = 250.0 if run.is_redis else 300.0
        run.check("t_max_floor", t_max >= floor, t_max, f">= {floor:.0f} tasks/s end to end")
        intents = {e.id: e.t for e in events if e.kind == "intent" and e.t >= soak_t0}
        firsts: dict[str, float] = {}
        for e in events:
            if e.kind == "start" and e.id in intents and e.id not in firsts:
                firsts[e.id] = e.t
        e2e = [(firsts[i] - intents[i]) * 1000 for i in firsts]
        soak_e2e = {q: percentile(e2e, q) for q in (50.0, 99.0, 99.9)}
        run.extra["soak_e2e_ms"] = {
            f"p{q:g}": round(v, 1) if v is not None else None for q, v in soak_e2e.items()
        }
        p99 = soak_e2e[99.0]
        run.check(
            "e2e_p99_ms",
            p99 is not None and p99 < 250,
            run.extra["soak_e2e_ms"],
            "p99 < 250 ms at 0.7 x T_max",
        )
        # RSS over the last 80 % of the soak, per worker slot that lived throughout.
        cut = 0.2 * soak
        per_pid: dict[int, list[tuple[float, float]]] = {}
        fds: dict[int, set[int]] = {}
        threads: dict[int, set[int]] = {}
        for row in samples:
            for w in row["workers"]:
                if row["t"] >= cut:
                    per_pid.setdefault(w["pid"], []).append((row["t"], w["rss_mib"]))
                    fds.setdefault(w["pid"], set()).add(int(w["fds"]))
                    threads.setdefault(w["pid"], set()).add(int(w["threads"]))
        slopes = {pid: _slope_per_min(s) for pid, s in per_pid.items()}
        ref_t = min(60.0, cut)
        growth = {}
        for pid, s in per_pid.items():
            ref = min(s, key=lambda x: abs(x[0] - ref_t))[1]
            growth[pid] = round(max(v for _, v in s) / ref, 3) if ref else None
        run.extra["rss_slope_mib_per_min"] = {
            p: round(v, 3) if v is not None else None for p, v in slopes.items()
        }
        run.extra["rss_max_over_ref"] = growth
        run.extra["rss_mib_last"] = {p: s[-1][1] for p, s in per_pid.items() if s}
        run.check(
            "rss_flat",
            bool(slopes) and all(v is not None and v < 1.0 for v in slopes.values()),
            run.extra["rss_slope_mib_per_min"],
            "< 1 MiB/min over the last 80 %",
        )
        run.check(
            "rss_max",
            bool(growth) and all(g is not None and g <= 1.25 for g in growth.values()),
            growth,
            "<= 1.25 x the value at the reference time",
        )
        fd_spread = {p: max(v) - min(v) for p, v in fds.items()}
        thread_spread = {p: max(v) - min(v) for p, v in threads.items()}
        run.extra["fd_spread"] = fd_spread
        run.extra["thread_spread"] = thread_spread
        run.check("fds_constant", all(v <= 2 for v in fd_spread.values()), fd_spread, "spread <= 2")
        run.check(
            "threads_constant",
            all(v == 0 for v in thread_spread.values()),
            thread_spread,
            "spread 0",
        )
        depths = [(r["t"], r["depth"]) for r in samples if r["depth"] is not None and r["t"] >= cut]
        if depths:
            run.extra["depth_max"] = max(d for _, d in depths)
            slope = _slope_per_min(depths)
            run.extra["depth_slope_per_min"] = round(slope, 2) if slope is not None else None
        return run.result(c, started=started)


def s9(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Retry storm: a dependency down for a while; full-jitter backoff, no waves, healthy tasks flow."""
    down = 60.0 if h.profile.name == "release" else 20.0
    with h.run("S9", broker) as run:
        started = time.time()
        n = h.profile.n(5000)
        run.pool.start()
        time.sleep(1.5)
        healthy_rate = 20.0
        baseline_s = 10.0
        storm_t0 = time.time() + baseline_s
        healthy_at = storm_t0 + down
        total_s = baseline_s + down + 5.0  # healthy throughput is compared up to recovery
        healthy = run.start_publisher(
            [Job("rel.work", (run.new_id(), 1.0)) for _ in range(int(healthy_rate * total_s))],
            rate=healthy_rate,
        )
        time.sleep(max(0.0, storm_t0 - time.time()))
        storm = Publisher(run.app, LedgerWriter(run.ledger_dir / "storm.jsonl"), None)
        storm.start(
            [
                Job("rel.flaky", (f"S9f-{run.rng.getrandbits(64):016x}", healthy_at))
                for _ in range(n)
            ]
        )
        storm.join()
        run.extra["storm_publish"] = storm.stats.summary()
        events, c = _finish(run, down + 2 * 30 + 240)
        run.publisher = healthy
        flaky = _starts_by_id(events, "rel.flaky")
        # Full jitter draws each delay from U(0, min(30, 2**k)) s: with 10 retries the
        # whole schedule is shorter than the outage for a few ids (about 0.02 % for a
        # 20 s outage, 7 % for 60 s). Those ids rightly end in the DLQ; any other dead
        # letter, or one before its 11th attempt, is a failure.
        dead = _dead_by_id(events)
        exhausted = {
            i
            for i in dead
            if len(flaky.get(i, [])) == 11 and all(e.t < healthy_at for e in flaky[i])
        }
        run.extra["exhausted_during_outage"] = len(exhausted)
        run.standard_checks(c, publish_failed=None, dead=len(exhausted))
        executed = {e.id for e in events if e.kind == "done" and e.id.startswith("S9f-")}
        run.check(
            "all_flaky_executed",
            len(executed) + len(exhausted) == n,
            len(executed),
            f"{n} (less those whose full schedule fit in the outage)",
        )
        attempts = sum(len(v) for v in flaky.values())
        run.extra["flaky_attempts"] = attempts
        run.check("total_attempts", attempts <= n * 11, attempts, f"<= {n * 11}")
        # A failing attempt publishes the next one at once: failures are retry publishes.
        failures = sorted(e.t for v in flaky.values() for e in v if e.t < healthy_at)
        buckets: dict[int, int] = {}
        for t in failures:
            buckets[int(t - storm_t0)] = buckets.get(int(t - storm_t0), 0) + 1
        run.extra["retry_publish_buckets"] = [buckets.get(i, 0) for i in range(int(down) + 1)]
        waves = []
        for b, count in sorted(buckets.items()):
            if b < 10 or b + 2 >= int(down):
                continue  # the first 10 s, and buckets whose neighbours reach past the outage
            neighbours = [buckets.get(b + d, 0) for d in (-2, -1, 1, 2)]
            avg = sum(neighbours) / 4
            if count >= 10 and count > 2 * avg:
                waves.append((b, count, avg))
        run.extra["retry_buckets_max"] = max(buckets.values(), default=0)
        run.check("no_waves", not waves, waves[:5], "no 1-s bucket > 2 x its neighbours after 10 s")
        h_done = [e.t for e in events if e.kind == "done" and not e.id.startswith("S9f-")]
        base = sum(1 for t in h_done if storm_t0 - baseline_s + 2 <= t < storm_t0) / (
            baseline_s - 2
        )
        during = sum(1 for t in h_done if storm_t0 <= t < healthy_at) / down
        run.extra["healthy_per_s"] = {"baseline": round(base, 1), "storm": round(during, 1)}
        run.check(
            "healthy_throughput",
            during >= 0.5 * base,
            run.extra["healthy_per_s"],
            ">= 50 % of baseline",
        )
        last_done = max(
            (e.t for e in events if e.kind == "done" and e.id.startswith("S9f-")), default=None
        )
        if last_done is not None:
            run.extra["all_done_after_recovery_s"] = round(last_done - healthy_at, 1)
            run.check(
                "done_in_time",
                last_done - healthy_at <= down + 60,
                run.extra["all_done_after_recovery_s"],
                f"<= {down + 60:.0f} s",
            )
        return run.result(c, started=started)


from .bounded import s10b, s11  # noqa: E402 - scenarios kept in their own module
from .parity import s15  # noqa: E402 - scenarios kept in their own module
from .poison import s7  # noqa: E402 - scenarios kept in their own module
from .security import s13, s14  # noqa: E402 - scenarios kept in their own module

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("N1", "confirms off + kill -9 RabbitMQ", ("RC",), n1, negative=True),
        Scenario("N2", "Redis RV SHUTDOWN NOSAVE", ("RV",), n2, negative=True),
        Scenario("N3", "early ack + SIGKILL", ("RQ",), n3, negative=True),
        Scenario("S0", "baseline", ("RQ", "RC", "RD"), s0),
        Scenario("S1", "worker SIGKILL", ("RQ", "RD"), s1),
        Scenario("S2", "worker SIGTERM drain", ("RQ", "RD"), s2),
        Scenario("S2b", "task longer than the drain timeout", ("RQ", "RD"), s2b),
        Scenario("S3", "RabbitMQ restart", ("RQ", "RC"), s3),
        Scenario("S4", "Redis restart", ("RD", "RV"), s4),
        Scenario("S5", "connection drops / black hole", ("RQ", "RD"), s5),
        Scenario("S6", "broker freeze", ("RQ", "RD"), s6),
        Scenario("S7", "poison messages", ("RQ", "RC", "RD"), s7),
        Scenario("S8", "always-failing task", ("RQ", "RD"), s8),
        Scenario("S8b", "crash loop", ("RQ", "RD"), s8b),
        Scenario("S9", "retry storm", ("RQ", "RD"), s9),
        Scenario("S10", "TTL shorter than retries", ("RQ", "RD"), s10),
        Scenario("S10b", "countdowns longer than consumer_timeout", ("RQ",), s10b),
        Scenario("S10c", "Redis countdown longer than the liveness window", ("RD",), s10c),
        Scenario("S11", "slow consumer, bounded queue", ("RQ", "RC", "RD"), s11),
        Scenario("S12", "soak", ("RQ", "RD"), s12),
        Scenario("S13", "TLS", ("RQ", "RD"), s13),
        Scenario("S14", "credential redaction", ("RQ", "RD"), s14),
        Scenario("S15", "memory:// parity", ("MEM",), s15),
    ]
}
