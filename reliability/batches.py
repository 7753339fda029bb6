"""Batch consumption under a worker SIGKILL: S21, items of a batch task, 1 % failing.

The harness publishes N items (10,000 in release, 2,000 in ci) of
:data:`~reliability.batch_tasks.BATCH` (``batch_size`` 100, ``batch_wait``
0.5 s) at :data:`RATE` per second, one message per item; one item in
:data:`BAD_EVERY` fails on purpose (the function lists it in
:exc:`~mqtasks.BatchFailures`). Two worker processes, each with a prefetch of
two batches, collect and run the batches. One is SIGKILLed mid-run, while it
holds unacknowledged messages (collected and running batches), and the
harness's supervisor replaces it.

Pass criteria, from the ledger and the dead-letter queue:

* every good item ran (a ``done``), none was dead-lettered;
* every bad item is dead-lettered, with reason ``max_retries_exceeded`` after its
  2 attempts, and never finished: dead-lettered alone, the rest of its batches acked;
* nothing lost, nothing unexpected; items run twice only within the killed
  process's in-flight window (its concurrency plus prefetch);
* the items ran in batches (few ``batch.ran`` runs, many items each);
* the killed worker was replaced within 1 s.

Run it alone: ``python -m reliability.batches [ci|release] [RQ] [RD]``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .app_env import use_app
from .batch_tasks import BAD_SUFFIX, BATCH, BATCH_SIZE, build_batch_app
from .events import check_restarts, wait_started
from .harness import Harness
from .ledger import Event
from .profiles import PROFILES, BrokerProfile
from .steps import finish, kill_instants, sleep_until
from .workload import Job

if TYPE_CHECKING:
    from .run import Run

__all__ = ["batch_figures", "s21"]

#: Worker processes, threads each, and prefetch (two batches held per process).
WORKERS = 2
CONCURRENCY = 2
PREFETCH = 2 * BATCH_SIZE
#: Items published per second.
RATE = 400.0
#: One item in this many fails on purpose.
BAD_EVERY = 100
#: The dead-letter reason and attempts of a bad item (max_retries=1).
BAD_REASON = "max_retries_exceeded"
BAD_ATTEMPTS = 2


def plan_jobs(run: Run, n: int) -> tuple[list[Job], set[str]]:
    """``n`` items, one in :data:`BAD_EVERY` failing, at random places; return them
    and the failing ones' ids."""
    bad_n = max(2, n // BAD_EVERY)
    jobs = [Job(BATCH, (run.new_id(),)) for _ in range(n - bad_n)]
    bad: set[str] = set()
    for _ in range(bad_n):
        task_id = run.new_id() + BAD_SUFFIX
        bad.add(task_id)
        jobs.insert(run.rng.randrange(len(jobs) + 1), Job(BATCH, (task_id,)))
    return jobs, bad


def batch_figures(
    events: Iterable[Event], good: Collection[str], bad: Collection[str]
) -> dict[str, Any]:
    """What became of the good and the bad items, from the ledger.

    Returns:
        ``good_not_done``: good ids with no ``done`` (a sample and how many);
        ``good_dead``: good ids dead-lettered; ``bad_done``: bad ids with a ``done``;
        ``bad_not_dead``: bad ids never dead-lettered (a sample and how many);
        ``bad_reasons``: the bad ids' dead-letter reasons, counted by id;
        ``bad_attempts``: their attempts, counted by id.
    """
    done: set[str] = set()
    reasons: dict[str, str] = {}
    attempts: dict[str, Any] = {}
    for e in events:
        if e.kind == "done":
            done.add(e.id)
        elif e.kind == "dead" and e.id not in reasons:
            reasons[e.id] = str(e.info.get("reason"))
            attempts[e.id] = e.attempt
    good, bad = set(good), set(bad)
    good_not_done = sorted(good - done)
    bad_not_dead = sorted(bad - reasons.keys())
    by_reason: dict[str, int] = defaultdict(int)
    by_attempts: dict[str, int] = defaultdict(int)
    for task_id in bad & reasons.keys():
        by_reason[reasons[task_id]] += 1
        by_attempts[str(attempts[task_id])] += 1
    return {
        "good_not_done": {"n": len(good_not_done), "sample": good_not_done[:10]},
        "good_dead": sorted(good & reasons.keys())[:10],
        "good_dead_n": len(good & reasons.keys()),
        "bad_done": sorted(bad & done)[:10],
        "bad_not_dead": {"n": len(bad_not_dead), "sample": bad_not_dead[:10]},
        "bad_reasons": dict(by_reason),
        "bad_attempts": dict(by_attempts),
    }


def s21(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Items of a batch task, 1 % failing on purpose, through a worker SIGKILL: every
    good item ran, every bad one is dead-lettered alone, nothing lost."""
    with h.run("S21", broker, workers=WORKERS, concurrency=CONCURRENCY, prefetch=PREFETCH) as run:
        started = time.time()
        use_app(run, "reliability.batch_tasks", build_batch_app, {})
        n = h.profile.n(10_000, minimum=2_000)
        jobs, bad = plan_jobs(run, n)
        run.extra.update(items=n, bad=len(bad), batch_size=BATCH_SIZE)
        run.pool.start()
        wait_started(run, WORKERS)
        publish_s = n / RATE
        main = run.start_publisher(jobs, rate=RATE)
        (at,) = kill_instants(run, 1, 1.5, max(3.0, 0.8 * publish_s))
        sleep_until(run, at)
        run.kill_worker(signal.SIGKILL, busy=True)
        main.join()
        run.extra["publisher_main"] = main.stats.summary()
        events, c = finish(run, max(120.0, 4 * publish_s + 60))
        _judge(run, events, c, {j.args[0] for j in jobs} - bad, bad)
        return run.result(c, started=started)


def _judge(run: Run, events: list[Event], c: Any, good: set[str], bad: set[str]) -> None:
    run.standard_checks(c, dup_bound=run.bound(1), dead=len(bad))
    run.worker_recovery(events)
    for fault in run.faults:  # a bad item that failed for good never starts again: left out
        delays = [d for i, d in fault.get("redelivery_s", {}).items() if i not in bad]
        fault["good_in_flight"] = len(delays)
        fault["good_recovery_s"] = None if None in delays else max(delays, default=0.0)
    f = batch_figures(events, good, bad)
    run.extra["batch_figures"] = f
    run.check("good_items_ran", f["good_not_done"]["n"] == 0, f["good_not_done"], "0 not done")
    run.check("good_items_not_dead_lettered", f["good_dead_n"] == 0, f["good_dead"], "none")
    run.check(
        "bad_items_dead_lettered_alone",
        f["bad_not_dead"]["n"] == 0
        and f["bad_reasons"] == {BAD_REASON: len(bad)}
        and f["bad_attempts"] == {str(BAD_ATTEMPTS): len(bad)},
        {k: f[k] for k in ("bad_not_dead", "bad_reasons", "bad_attempts")},
        f"all {len(bad)} as {BAD_REASON} after {BAD_ATTEMPTS} attempts",
    )
    run.check("bad_items_never_done", not f["bad_done"], f["bad_done"], "none")
    batches = run.log_count('"batch.ran"')
    starts = sum(1 for e in events if e.kind == "start")
    mean = round(starts / batches, 1) if batches else None
    run.extra["batches"] = {"runs": batches, "starts": starts, "mean_items": mean}
    run.check(
        "ran_in_batches",
        mean is not None and mean >= BATCH_SIZE / 10,
        run.extra["batches"],
        f"at least {BATCH_SIZE // 10} items per batch on average",
    )
    kills = sum(1 for e in run.pool.exits if e.code == -signal.SIGKILL)
    run.check("one_sigkill", kills == 1, kills, "1")
    check_restarts(run, 1)


def main(argv: list[str]) -> int:
    """Run S21 alone: ``[profile] [broker profiles...]`` (ci, RQ and RD by default)."""
    profile = PROFILES[argv[0] if argv else "ci"]
    brokers: list[BrokerProfile] = [b for b in ("RQ", "RD") if b in argv[1:]] or ["RQ", "RD"]
    ok = True
    workdir = Path(tempfile.mkdtemp(prefix="mqtasks-s21-"))
    os.chmod(workdir, 0o755)  # the RabbitMQ node runs as another user below it
    harness = Harness(workdir, profile, int(time.time()))
    try:
        for broker in brokers:
            row = s21(harness, broker)
            ok = ok and bool(row["passed"])
            print(json.dumps(row, default=str), flush=True)
    finally:
        harness.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
