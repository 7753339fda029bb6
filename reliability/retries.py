"""Tasks that fail: S8 (always failing, on the retry schedule), S8b (crash loop
under a delivery limit) and S9 (retry storm while a dependency is down).

:func:`s8_checks` holds S8's criteria so that S15 judges ``memory://`` by the
same ones.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from mqtasks.exceptions import ConfigurationError

from .harness import Harness
from .ledger import Checks, Classification, Event, LedgerWriter
from .profiles import BrokerProfile
from .publisher import Publisher
from .run import Run
from .steps import dead_by_id, finish, starts_by_id
from .workload import Job

__all__ = ["s8", "s8_checks", "s8b", "s9"]


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
        events, c = finish(run, 120)
        s8_checks(run, events, c, n, run.queue)
        return run.result(c, started=started)


def s8_checks(checks: Checks, events: list[Event], c: Classification, n: int, queue: str) -> None:
    """S8's criteria: exactly 4 starts per id, one DLQ entry with the reason,
    attempts, exception, traceback and queue, on the 0.2, 0.4, 0.8 s schedule."""
    checks.standard_checks(c, dead=n)
    starts = starts_by_id(events)
    dead = dead_by_id(events)
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
            events, c = finish(run, 300)
            starts = starts_by_id(events)
            dead = dead_by_id(events)
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
        events, c = finish(run, down + 2 * 30 + 240)
        run.publisher = healthy
        flaky = starts_by_id(events, "rel.flaky")
        # Full jitter draws each delay from U(0, min(30, 2**k)) s: with 10 retries the
        # whole schedule is shorter than the outage for a few ids (about 0.02 % for a
        # 20 s outage, 7 % for 60 s). Those ids rightly end in the DLQ; any other dead
        # letter, or one before its 11th attempt, is a failure.
        dead = dead_by_id(events)
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
