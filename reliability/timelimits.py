"""Hard time limits under a worker SIGKILL: S19, tasks that never end among ordinary ones.

The harness publishes N tasks (500 in release) at :data:`RATE` per second, one
in ten of them hanging: half an endless Python loop
(:data:`~reliability.timelimit_tasks.SPIN`), half ``time.sleep(3600)``
(:data:`~reliability.timelimit_tasks.BLOCK`), each with a hard limit of 2 s; the
rest are W-mix :data:`~reliability.timelimit_tasks.WORK` tasks. Two worker
processes run them in threads. One is SIGKILLed mid-run, and the harness's
supervisor replaces it. In a thread the worker stops a hung task by an
asynchronous exception (which ends the Python loop, never the sleep), settles
its message (dead letter, reason ``time_limit``, then ack) and gives the thread
up; a process whose given-up threads go on running asks to be replaced (exit
code 5, ``worker.recycle``), and the supervisor replaces it too.

Once the run is quiescent, a final batch of :data:`FINAL_MS` ms tasks is
published all at once: a slot left stuck by a hung task would show as a
process running fewer of them at once than its concurrency.

Pass criteria, from the ledger and the dead-letter queue:

* every hung task is dead-lettered, with reason ``time_limit`` and no other, and
  none ever finished;
* every ordinary task ran (none dead-lettered), nothing lost, nothing unexpected,
  duplicates within the killed process's in-flight window;
* every worker exit is the SIGKILL or a recycle (code 5), and at least one
  recycle happened (a sleeping thread cannot be stopped); each replaced within 1 s;
* the final batch ran entirely, and every process that ran at least two rounds
  of it ran as many of its tasks at once as it has threads.

Sizes: release 500 tasks (50 hung), ci 200 (20 hung), each about 30 to 50 s per broker.
"""

from __future__ import annotations

import signal
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from .app_env import use_app
from .events import check_restarts, wait_started
from .harness import Harness
from .ledger import Event
from .profiles import BrokerProfile
from .steps import finish, kill_instants, sleep_until
from .timelimit_tasks import BLOCK, HARD_LIMIT, SPIN, WORK, build_timelimit_app
from .workload import WMIX_MEAN_S, Job, wmix_ms

if TYPE_CHECKING:
    from .run import Run

__all__ = ["hung_figures", "peak_overlap", "s19"]

#: Worker processes, threads each, and prefetch (2 x threads, mqtasks' default ratio).
WORKERS = 2
CONCURRENCY = 4
PREFETCH = 8
#: Tasks published per second.
RATE = 100.0
#: One task in this many hangs.
HUNG_EVERY = 10
#: The final batch's task duration (ms) and size (rounds of every slot of both processes).
FINAL_MS = 300.0
FINAL_ROUNDS = 4
#: Exit code of a worker that asked to be replaced (``mqtasks._supervise.RET_RECYCLE``).
RECYCLE_CODE = 5
#: Seconds a hung task may take past its limit to reach the dead-letter queue.
STOP_SLACK = 3.0


def plan_jobs(run: Run, n: int) -> tuple[list[Job], set[str]]:
    """``n`` jobs, one in :data:`HUNG_EVERY` hanging (SPIN and BLOCK in turn) at random
    places among W-mix WORK jobs; return them and the hanging ones' ids."""
    hung_n = max(2, n // HUNG_EVERY)
    jobs = [Job(WORK, (run.new_id(), wmix_ms(run.rng))) for _ in range(n - hung_n)]
    hung: set[str] = set()
    for i in range(hung_n):
        task_id = run.new_id()
        hung.add(task_id)
        jobs.insert(run.rng.randrange(len(jobs) + 1), Job(SPIN if i % 2 else BLOCK, (task_id,)))
    return jobs, hung


def hung_figures(events: Iterable[Event], hung: Collection[str]) -> dict[str, Any]:
    """What became of the hung tasks and of the others, from the ledger.

    Returns:
        ``hung``: how many; ``dead_time_limit``: hung ids dead-lettered with reason
        ``time_limit``; ``other_reasons``: reasons other than ``time_limit`` of hung
        ids, counted by id; ``not_dead``: hung ids never dead-lettered (a sample);
        ``finished``: hung ids with a ``done``; ``others_dead``: the other ids
        dead-lettered, by reason; ``stop_s``: per hung id, seconds from its last
        start before its dead letter to the dead letter (p50 and max).
    """
    reasons: dict[str, set[str]] = defaultdict(set)
    dead_at: dict[str, float] = {}
    starts: dict[str, list[float]] = defaultdict(list)
    done: set[str] = set()
    for e in events:
        if e.kind == "dead":
            reasons[e.id].add(str(e.info.get("reason")))
            at = e.info.get("failed_at")
            if isinstance(at, (int, float)):
                dead_at[e.id] = min(float(at), dead_at.get(e.id, float(at)))
        elif e.kind == "start":
            starts[e.id].append(e.t)
        elif e.kind == "done":
            done.add(e.id)
    hung = set(hung)
    other: Counter[str] = Counter()
    for task_id in hung:
        other.update(r for r in reasons.get(task_id, ()) if r != "time_limit")
    others_dead: Counter[str] = Counter()
    for task_id, rs in reasons.items():
        if task_id not in hung:
            others_dead.update(rs)
    stops = sorted(
        at - max(t for t in starts[i] if t <= at)
        for i, at in dead_at.items()
        if i in hung and any(t <= at for t in starts.get(i, ()))
    )
    return {
        "hung": len(hung),
        "dead_time_limit": sum(1 for i in hung if "time_limit" in reasons.get(i, ())),
        "other_reasons": dict(other),
        "not_dead": sorted(i for i in hung if i not in reasons)[:10],
        "finished": len(hung & done),
        "others_dead": dict(others_dead),
        "stop_s": {
            "p50": round(stops[len(stops) // 2], 3) if stops else None,
            "max": round(stops[-1], 3) if stops else None,
        },
    }


def peak_overlap(events: Iterable[Event], ids: Collection[str]) -> dict[int, dict[str, int]]:
    """Per process, how many of ``ids`` it ran (start to done) and the most it ran at once."""
    ids = set(ids)
    spans: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e.id not in ids or e.pid is None or e.kind not in ("start", "done"):
            continue
        span = spans.setdefault((e.id, e.pid), [])
        # The first start and the done after it (a second run on the same process
        # would start again: the first run's span is the one kept).
        if len(span) == (0 if e.kind == "start" else 1):
            span.append(e.t)
    by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
    ran: Counter[int] = Counter()
    for (_, pid), span in spans.items():
        if len(span) == 2:
            ran[pid] += 1
            by_pid[pid] += [(span[0], 1), (span[1], -1)]
    out: dict[int, dict[str, int]] = {}
    for pid, marks in by_pid.items():
        level = peak = 0
        for _, step in sorted(marks):  # at a tie an end (-1) comes before a start
            level += step
            peak = max(peak, level)
        out[pid] = {"ran": ran[pid], "peak": peak}
    return out


def s19(h: Harness, broker: BrokerProfile) -> dict[str, Any]:
    """Tasks past their hard time limit (an endless loop, a long sleep) among ordinary
    ones, through a worker SIGKILL: dead-lettered as ``time_limit``, nothing lost,
    no slot left stuck."""
    with h.run("S19", broker, workers=WORKERS, concurrency=CONCURRENCY, prefetch=PREFETCH) as run:
        started = time.time()
        use_app(run, "reliability.timelimit_tasks", build_timelimit_app, {})
        n = h.profile.n(500, minimum=200)
        jobs, hung = plan_jobs(run, n)
        run.extra.update(tasks=n, hung=len(hung), hard_limit_s=HARD_LIMIT)
        run.pool.start()
        wait_started(run, WORKERS)
        publish_s = n / RATE
        main = run.start_publisher(jobs, rate=RATE)
        (at,) = kill_instants(run, 1, 2.0, max(4.0, 0.8 * publish_s))
        sleep_until(run, at)
        run.kill_worker(signal.SIGKILL, busy=True)
        main.join()
        run.extra["publisher_main"] = main.stats.summary()
        # Hung tasks hold a slot for the limit each; recycled processes take a few s to
        # start again; a killed Redis consumer's messages come back after its liveness TTL.
        slots = WORKERS * CONCURRENCY
        estimate = publish_s + len(hung) * (HARD_LIMIT / slots + 2.0) + n * WMIX_MEAN_S / slots
        ok = run.wait_quiescent(max(120.0, 2 * estimate + 60))
        run.check("quiescent_before_final", ok, ok, "the hung tasks settled")
        final_n = FINAL_ROUNDS * slots
        final = [Job(WORK, (run.new_id(), FINAL_MS)) for _ in range(final_n)]
        run.extra["final_published_at"] = run.rel()
        run.publish_all(final)
        events, c = finish(run, 120.0)
        _judge(run, events, c, hung, {j.args[0] for j in final}, n)
        return run.result(c, started=started)


def _judge(run: Run, events: list[Event], c: Any, hung: set[str], final: set[str], n: int) -> None:
    run.standard_checks(c, dup_bound=run.bound(1), dead=len(hung))
    f = hung_figures(events, hung)
    run.extra["hung_figures"] = f
    run.check(
        "hung_dead_lettered_time_limit",
        f["dead_time_limit"] == len(hung) and not f["other_reasons"],
        {"time_limit": f["dead_time_limit"], "other": f["other_reasons"], "not": f["not_dead"]},
        f"all {len(hung)} with reason time_limit, no other reason",
    )
    run.check("hung_never_finished", f["finished"] == 0, f["finished"], "0")
    run.check("others_not_dead_lettered", not f["others_dead"], f["others_dead"], "none")
    stop_max = f["stop_s"]["max"]
    run.check(
        "stopped_at_the_limit",
        stop_max is not None and stop_max <= HARD_LIMIT + STOP_SLACK,
        f["stop_s"],
        f"each dead-lettered within {HARD_LIMIT + STOP_SLACK:g} s of its (last) start",
    )
    done = {e.id for e in events if e.kind == "done"}
    ordinary = n - len(hung)
    ran = len(done - final - hung)
    run.check("ordinary_tasks_ran", ran == ordinary, ran, str(ordinary))
    codes = Counter(e.code for e in run.pool.exits)
    run.extra["exit_codes"] = {str(k): v for k, v in sorted(codes.items())}
    kills = codes.get(-signal.SIGKILL, 0)
    recycles = codes.get(RECYCLE_CODE, 0)
    run.check(
        "exits_are_the_kill_and_recycles",
        kills == 1 and kills + recycles == sum(codes.values()),
        run.extra["exit_codes"],
        f"1 SIGKILL (-9), the rest recycles ({RECYCLE_CODE})",
    )
    run.check(
        "recycled",
        recycles >= 1,
        recycles,
        ">= 1: a thread in time.sleep cannot be stopped, its process is replaced",
    )
    check_restarts(run, 1)
    final_done = len(final & done)
    run.check("final_batch_ran", final_done == len(final), final_done, str(len(final)))
    overlap = peak_overlap(events, final)
    run.extra["final_by_process"] = {str(pid): v for pid, v in overlap.items()}
    judged = [v for v in overlap.values() if v["ran"] >= 2 * CONCURRENCY]
    run.check(
        "no_slot_stuck",
        bool(judged) and all(v["peak"] == CONCURRENCY for v in judged),
        run.extra["final_by_process"],
        f"each process that ran >= {2 * CONCURRENCY} final tasks ran {CONCURRENCY} at once",
    )
