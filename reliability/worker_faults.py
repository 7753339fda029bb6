"""Faults that hit worker processes: S1 (SIGKILL mid-task), S2 (SIGTERM drain) and
S2b (a task longer than the drain timeout)."""

from __future__ import annotations

import signal
import time
from typing import Any

from .harness import Harness
from .profiles import BrokerProfile
from .steps import finish, kill_instants, sigkill_while_publishing, sleep_until, wmix_timeout
from .workload import Job

__all__ = ["s1", "s2", "s2b"]


def s1(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Worker SIGKILL mid-task, 5 times, publishing at 200/s."""
    with h.run("S1", broker) as run:
        started = time.time()
        n = h.profile.n(10000)
        sigkill_while_publishing(run, n, spread=0.8)
        events, c = finish(run, wmix_timeout(run, n, 60))
        run.worker_recovery(events)
        run.standard_checks(c, dup_bound=run.bound(5))
        # Redis and PostgreSQL give a killed worker's messages back after a liveness
        # window or a lease (30 s) and a poll; RabbitMQ at once, with its connection.
        limit = 40.0 if run.is_redis or run.is_postgres else 5.0
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
        for t in kill_instants(run, 3, 2.0, max(12.0, 0.7 * est), min_gap=3.0):
            sleep_until(run, t)
            # A worker that is draining: a replacement started by the previous
            # kill may still be importing its app on a loaded machine.
            f = run.kill_worker(signal.SIGTERM, busy=True)
            e = run.pool.wait_exit(f["pid"], drain + 10)
            f["exit_code"] = e.code if e else None
            f["exit_after_s"] = round(e.t - f["at"], 2) if e else None
        events, c = finish(run, max(120.0, 3 * est + 60))
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
        _, c = finish(run, task_s + 120)
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
