"""Ordered tasks against plain ones: the drain of a prefilled queue by ``mqtasks worker -p 2``.

A queue is filled with N no-op tasks over ``--keys`` keys, no worker running, then
``mqtasks worker -p 2`` (the suite's command line, two processes) drains it; the rate
runs from the first task's start to the last's (``benchmarks/_record.py``), as in the
suite's drain. The task ordered by its key (``ordering_key="key"``, ``--partitions``
partitions, a result backend in Redis database 13) against the same task without
ordering, each with a fresh worker. The records also tell how many tasks of a key
started before an earlier one of their key. Target: ordered >= 0.5 x plain.

Part of ``python -m benchmarks.patterns`` (phase ``ordered``); ``python -m
benchmarks.ordered [options]`` runs that phase alone, with the same options.
See ``benchmarks/README.md`` ("Messaging patterns").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from ._record import RECORD, Log, target_row
from ._systems import Context, mqtasks_worker_argv
from ._workers import Records, WorkerProcess, tree_cpu_s, wait_count
from .bench_patterns_app import make_keyed_app
from .throughput import BROKERS, _sweep_redis, bounded

__all__ = [
    "BACKEND_URL",
    "delete_queues",
    "ordered_rows",
    "ordered_table",
    "ratio",
    "run_ordered",
    "run_tag",
]

#: The ordered tasks' result backend: a database of this benchmark's own on the local Redis.
BACKEND_URL = "redis://127.0.0.1:6379/13"


def run_tag(ctx: Context, broker: str, what: str, rnd: int) -> str:
    """The name of one measurement's queues and keys: ``bench-<run>-<broker>-<what>-r<round>``."""
    return f"bench-{ctx.run_id}-{broker}-{what}-r{rnd}"


def delete_queues(app: Any, names: list[str]) -> None:
    """Delete ``names`` and their dead-letter queues through ``app``'s transport; close it."""
    from mqtasks.transport.queue import dead_letter_spec

    try:
        specs = [app.queue(name) for name in names]
        specs += [dead_letter_spec(spec) for spec in specs]
        with contextlib.suppress(Exception):
            bounded(lambda: app.transport.delete(specs), 30, "delete")
    finally:
        bounded(app.close, 30, "app.close")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def _partition_queues(queue: str, partitions: int) -> list[str]:
    width = len(str(partitions - 1))
    return [f"{queue}.p{i:0{width}d}" for i in range(partitions)]


def _prefill(
    task: Any, n: int, keys: int, threads: int, base: int, deadline: float
) -> tuple[float, int, list[str]]:
    """Publish ``n`` tasks over ``keys`` keys from ``threads`` threads; a key stays in one
    thread, so that each key's tasks are published in ``seq`` order.

    A publish the broker refuses is counted and the thread goes on with the next (the
    worker then skips that key's missing number after its gap timeout); a thread stops
    on any other error. Returns (seconds, publishes refused, errors).
    """
    from mqtasks.exceptions import PublishError

    errors: list[str] = []
    refused: list[int] = []
    groups: list[list[int]] = [[] for _ in range(threads)]
    for k in range(n):
        groups[(k % keys) % threads].append(k)

    def run(seqs: list[int]) -> None:
        try:
            for count, k in enumerate(seqs):
                try:
                    task.delay(k % keys, base + k, time.time())
                except PublishError as exc:
                    refused.append(k)
                    if len(errors) < 5:
                        errors.append(f"prefill, publish refused (the run goes on): {exc!r}")
                if not count & 255 and time.monotonic() > deadline:
                    errors.append(f"prefill timed out at {count}/{len(seqs)}")
                    return
        except BaseException as exc:  # reported, not raised, from a thread
            errors.append(f"prefill: {exc!r}")

    workers = [threading.Thread(target=run, args=(g,), daemon=True) for g in groups if g]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(1.0, deadline - time.monotonic() + 30))
    return time.perf_counter() - t0, len(refused), errors


def _per_process(record_dir: str, base: int, t0: float) -> list[dict[str, float]]:
    """Per worker process (record file): its tasks, and its first and last start after ``t0``."""
    out = []
    for name in sorted(os.listdir(record_dir)):
        if name.endswith(".rec"):
            with open(os.path.join(record_dir, name), "rb") as fh:
                data = fh.read()
            data = data[: len(data) - len(data) % RECORD.size]
            mine = [start for seq, _, start in RECORD.iter_unpack(data) if seq >= base]
            if mine:
                out.append(
                    {
                        "tasks": len(mine),
                        "first_s": round(min(mine) - t0, 3),
                        "last_s": round(max(mine) - t0, 3),
                    }
                )
    return sorted(out, key=lambda p: -p["tasks"])


def _order_check(recs: list[tuple[int, float, float]], keys: int, base: int) -> dict[str, int]:
    """Tasks that started before an earlier task (by seq) of their key, and duplicates."""
    by_key: dict[int, list[tuple[int, float]]] = defaultdict(list)
    seqs: Counter[int] = Counter()
    for seq, _, start in recs:
        if seq >= base:
            by_key[(seq - base) % keys].append((seq, start))
            seqs[seq] += 1
    early = 0
    for items in by_key.values():
        items.sort()
        latest = float("-inf")
        for _, start in items:
            if start < latest:
                early += 1
            latest = max(latest, start)
    return {"started_before_an_earlier_one": early, "duplicates": sum(c - 1 for c in seqs.values())}


def run_ordered(broker: str, ctx: Context, rnd: int, variant: str, log: Log) -> dict[str, Any]:
    """Prefill N keyed tasks, then time their drain by ``mqtasks worker -p 2``."""
    opts = ctx.opts
    url = BROKERS[broker]
    ordered = variant == "ordered"
    tag = run_tag(ctx, broker, variant, rnd)
    queue = tag
    backend_prefix = tag + "-results:"
    names = [queue] + (_partition_queues(queue, opts.partitions) if ordered else [])
    if broker == "amqp":
        ctx.amqp_queues.update(names + [f"{q}.dlq" for q in names])
    out: dict[str, Any] = {"broker": broker, "phase": variant, "round": rnd, "problems": []}
    problems: list[str] = out["problems"]
    record_dir = os.path.join(ctx.run_dir, f"{broker}-{variant}-r{rnd}")
    records = Records(record_dir)
    app, task = make_keyed_app(
        url,
        queue,
        ordered=ordered,
        backend_url=BACKEND_URL,
        backend_prefix=backend_prefix,
        keyprefix=tag + ":",
        partitions=opts.partitions,
    )
    worker: WorkerProcess | None = None
    base = 1_000_000
    n = opts.ordered_tasks
    try:
        app.declare()
        # The first publish connects (and, ordered, opens the backend) outside the timing.
        task.delay(-1, -1, time.time())
        seconds, refused, errors = _prefill(
            task, n, opts.keys, opts.publishers, base, time.monotonic() + opts.timeout
        )
        problems.extend(errors)
        out["publish_refused"] = refused
        n -= refused  # what the worker can run
        out["prefill_per_s"] = n / seconds if seconds > 0 else None
        env = dict(os.environ)
        env.update(
            BENCH_BROKER_URL=url,
            BENCH_QUEUE=queue,
            BENCH_KEYPREFIX=tag + ":",
            BENCH_BACKEND_URL=BACKEND_URL,
            BENCH_BACKEND_PREFIX=backend_prefix,
            BENCH_RECORD_DIR=record_dir,
            BENCH_ORDERED="1" if ordered else "0",
            BENCH_PARTITIONS=str(opts.partitions),
            PYTHONUNBUFFERED="1",
        )
        for name in ("MQTASKS_BROKER_URL", "MQTASKS_BACKEND_URL"):
            env.pop(name, None)
        argv = mqtasks_worker_argv("benchmarks.bench_patterns_app")
        argv += ["-p", str(opts.processes)]
        argv[argv.index("--log-level") + 1] = opts.worker_log_level
        started = time.time()
        worker = WorkerProcess(
            argv, env, os.path.join(ctx.run_dir, f"{broker}-{variant}-r{rnd}.log")
        )
        status, _ = wait_count(
            records, {}, 1, timeout=opts.startup, stall=opts.startup, alive=worker.alive
        )
        if status != "ok":
            problems.append(f"worker did not start a task: {status}\n{worker.tail()}")
            return out
        cpu0 = tree_cpu_s(worker.pid)
        status, _ = wait_count(
            records, {}, n + 1, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
        )
        cpu1 = tree_cpu_s(worker.pid)
        if status != "ok":
            problems.append(f"drain: {status}")
        recs = [r for r in records.read() if r[0] >= base]
        starts = sorted(r[2] for r in recs)
        out["ran"] = len(recs)
        if len(starts) > 1:
            out["drain_per_s"] = (len(starts) - 1) / (starts[-1] - starts[0])
            out["drain_from_worker_start_per_s"] = len(starts) / (starts[-1] - started)
        if recs:
            out["worker_cpu_us_per_task"] = (cpu1 - cpu0) / len(recs) * 1e6
        out.update(_order_check(recs, opts.keys, base))
        out["per_process"] = procs = _per_process(record_dir, base, starts[0] if starts else 0.0)
        if len(procs) == opts.processes > 1:
            # The rate while every process was running tasks: the drain without the
            # start, when the partitions are still being shared out.
            lo = starts[0] + max(p["first_s"] for p in procs)
            hi = starts[0] + min(p["last_s"] for p in procs)
            if hi - lo >= 0.5:
                out["all_busy_per_s"] = sum(lo <= t <= hi for t in starts) / (hi - lo)
        log(
            f"prefill {out.get('prefill_per_s') or 0:,.0f}/s; drain {out.get('drain_per_s', 0):,.0f}"
            f"/s ({status}); worker CPU {out.get('worker_cpu_us_per_task', 0):,.0f} µs/task; "
            f"started before an earlier task of their key: {out['started_before_an_earlier_one']}"
        )
    finally:
        if worker is not None:
            # SIGTERM to the supervisor alone, which stops its processes (releasing their
            # partition leases); a SIGTERM to the whole group would reach each process
            # twice, which it takes as a forced exit.
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(opts.grace)
            out["worker_exit"] = worker.stop(grace=opts.grace)
            if problems:
                out["worker_log_tail"] = worker.tail()
        delete_queues(app, names)
        _sweep_redis(BACKEND_URL, tag)
    return out


# -- summary ---------------------------------------------------------------------------------


def ordered_rows(rounds: list[dict[str, Any]], broker: str) -> list[dict[str, Any]]:
    """The targets rows of the ordered drains on ``broker``: ordered / plain within each
    round, and the same while every worker process ran tasks (for information)."""
    rows: list[dict[str, Any]] = []
    for key, name, target, bound in (
        ("drain_per_s", "ordered / plain, drain tasks/s", ">= 0.5", 0.5),
        ("all_busy_per_s", "the same, while every process ran", "(info)", None),
    ):
        by_round: dict[int, dict[str, float]] = defaultdict(dict)
        for r in rounds:
            if r["broker"] == broker and r["phase"] in ("ordered", "plain") and key in r:
                by_round[r["round"]][r["phase"]] = r[key]
        values = [v for d in by_round.values() if (v := ratio(d.get("ordered"), d.get("plain")))]
        if values:
            rows.append(target_row(broker, name, values, target, bound, "ge"))
    return rows


def ordered_table(rounds: list[dict[str, Any]], opts: argparse.Namespace) -> list[str]:
    """The table of the ordered drains, one line per measurement, with its notes."""
    keyed = [r for r in rounds if r["phase"] in ("ordered", "plain")]
    if not keyed:
        return []
    lines = [
        f"ordered tasks: {opts.ordered_tasks} no-op tasks over {opts.keys} keys, prefilled, "
        f"drained by mqtasks worker -c 8 -p {opts.processes}; ordered: {opts.partitions} "
        "partitions",
        f"{'broker':7} {'round':>5} {'variant':8} {'prefill/s':>10} {'drain/s':>9} "
        f"{'all busy':>9} {'CPU µs/task':>12} {'ran':>6} {'early':>6} {'dup':>4}  "
        "per process: tasks (first-last start, s)",
    ]
    for r in keyed:
        lines.append(
            f"{r['broker']:7} {r['round'] + 1:>5} {r['phase']:8} "
            f"{r.get('prefill_per_s') or 0:10,.0f} {r.get('drain_per_s', 0):9,.0f} "
            f"{r.get('all_busy_per_s', 0):9,.0f} "
            f"{r.get('worker_cpu_us_per_task', 0):12,.0f} "
            f"{r.get('ran', '-')!s:>6} "
            f"{r.get('started_before_an_earlier_one', '-')!s:>6} "
            f"{r.get('duplicates', '-')!s:>4}  "
            + ", ".join(
                f"{p['tasks']} ({p['first_s']:.2f}-{p['last_s']:.2f})"
                for p in r.get("per_process", [])
            )
        )
    lines += [
        "  all busy: tasks/s while every worker process was running tasks (0: they "
        "did not overlap for 0.5 s)",
        "  ran: of the tasks published (a task dead-lettered, by the ordering's "
        "sequence checks for one, is missing); early: tasks that started before a task "
        "of their key published earlier (plain tasks have no order to keep)",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.patterns --phases ordered`` with ``argv``'s options."""
    from .patterns import main as patterns_main

    return patterns_main(["--phases", "ordered", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
