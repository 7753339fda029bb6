"""Messaging patterns: what an event and an ordered task cost, on the local RabbitMQ and Redis.

Three measurements, each set against its plain counterpart in the same run and round:

1. **emit** (both brokers): one thread calls ``app.emit("bench.x", payload)`` N times,
   three subscribers (three queues) matching it, against ``one.delay(payload)`` of a
   one-queue task; every call returns once the broker has the message (confirmed). No
   worker runs. The two loops take turns, ``--block`` calls at a time, so that the
   machine's load changing during the run hits both alike.
2. **commands** (Redis): the Redis commands one ``emit()`` to three subscribers costs,
   and one ``delay()``: the server's ``MONITOR`` stream during N calls, counting the
   commands of this process's connections and those the server ran inside their
   scripts (Lua, on this run's keys); and, as a cross-check, ``INFO commandstats``
   deltas of the whole server (other clients included).
3. **ordered** (both brokers): a queue is filled with N no-op tasks over ``--keys`` keys,
   no worker running, then ``mqtasks worker -p 2`` (the suite's command line, two
   processes) drains it; the rate runs from the first task's start to the last's
   (``benchmarks/_record.py``), as in the suite's drain. The task ordered by its key
   (``ordering_key="key"``, ``--partitions`` partitions, a result backend in Redis
   database 13) against the same task without ordering, each with a fresh worker. The
   records also tell how many tasks of a key started before an earlier one of their key.

Figures and ratios are printed, never asserted. Every queue, exchange and key of the run
carries the run's id and is deleted at the end, also after an error, Ctrl-C or SIGTERM.
Run ``python -m benchmarks.patterns --help``; see ``benchmarks/README.md`` ("Messaging
patterns").
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import structlog

from ._record import RECORD
from ._redis_commands import Monitor, commandstats, count_commands, own_ports
from .bench_patterns_app import EVENT, SUBSCRIBERS, emit_queues, make_emit_app, make_keyed_app
from .suite import (
    Context,
    Records,
    WorkerProcess,
    _cleanup_amqp,
    add_worker_options,
    mqtasks_worker_argv,
    print_configs,
    run_header,
    tree_cpu_s,
    wait_count,
    write_json,
)
from .throughput import BROKERS, _sweep_redis, bounded

HERE = os.path.dirname(os.path.abspath(__file__))
#: The ordered tasks' result backend: a database of this benchmark's own on the local Redis.
BACKEND_URL = "redis://127.0.0.1:6379/13"
PHASES = ("emit", "commands", "ordered")
#: What an emit to three subscribers should cost on Redis: the EVALSHA, the HGETALL of the
#: bindings in its script, one LPUSH per subscriber queue.
COMMANDS_TARGET = 2 + SUBSCRIBERS


# -- small helpers ---------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _tag(ctx: Context, broker: str, what: str, rnd: int) -> str:
    return f"bench-{ctx.run_id}-{broker}-{what}-r{rnd}"


def _delete_queues(app: Any, names: list[str]) -> None:
    """Delete ``names`` and their dead-letter queues through ``app``'s transport; close it."""
    from mqtasks.transport.queue import dead_letter_spec

    try:
        specs = [app.queue(name) for name in names]
        specs += [dead_letter_spec(spec) for spec in specs]
        with contextlib.suppress(Exception):
            bounded(lambda: app.transport.delete(specs), 30, "delete")
    finally:
        bounded(app.close, 30, "app.close")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- 1. emit() to three subscribers against delay() ------------------------------------------


def run_emit(broker: str, ctx: Context, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time N confirmed ``emit()`` calls and N ``delay()`` calls from one thread."""
    opts = ctx.opts
    url = BROKERS[broker]
    tag = _tag(ctx, broker, "emit", rnd)
    exchange = f"{tag}-events"
    subscriber_queues, task_queue = emit_queues(tag)
    queues = [*subscriber_queues, task_queue]
    if broker == "amqp":
        ctx.amqp_queues.update(queues + [f"{q}.dlq" for q in queues])
        ctx.amqp_exchanges.add(exchange)
    out: dict[str, Any] = {"broker": broker, "phase": "emit", "round": rnd, "problems": []}
    app, one = make_emit_app(url, tag, exchange=exchange, keyprefix=tag + ":")
    try:
        app.declare()
        app.declare_events()
        # Outside the timing: connect, load scripts, and check the routing.
        one.delay({"seq": -1})
        handle = app.emit(EVENT, {"seq": -1})
        if handle.routed not in (None, SUBSCRIBERS):
            out["problems"].append(f"emit reached {handle.routed} queues, not {SUBSCRIBERS}")
        emit = app.emit
        delay = one.delay
        calls: dict[str, Callable[[int], Any]] = {
            "delay": lambda i: delay({"seq": i}),
            "emit": lambda i: emit(EVENT, {"seq": i}),
        }
        specs = [app.queue(q) for q in queues]
        bounded(lambda: app.transport.purge(specs), 30, "purge")
        # The two loops take turns, --block calls at a time (the first turn alternating
        # from round to round), so that a change in the machine's load between them
        # hits both alike; each side's rate is its calls over the sum of its turns.
        n, block = opts.events, opts.block
        spent = {"delay": 0.0, "emit": 0.0}
        done = {"delay": 0, "emit": 0}
        deadline = time.monotonic() + opts.timeout
        turns = ["delay", "emit"] if rnd % 2 == 0 else ["emit", "delay"]
        while min(done.values()) < n and not out["problems"]:
            for which in turns:
                call, first = calls[which], done[which]
                count = min(block, n - first)
                t0 = time.perf_counter()
                for i in range(first, first + count):
                    call(i)
                spent[which] += time.perf_counter() - t0
                done[which] += count
                if time.monotonic() > deadline:
                    out["problems"].append(f"timed out at {done[which]}/{n} {which}() calls")
                    break
        for which in turns:
            if spent[which] > 0:
                out[f"{which}_per_s"] = done[which] / spent[which]
        counts = app.transport.message_counts(specs)
        out["queued_last"] = {q: counts.get(q) for q in queues}
        bounded(lambda: app.transport.purge(specs), 30, "purge")
    finally:
        _delete_queues(app, queues)
    out["emit_per_delay"] = _ratio(out.get("emit_per_s"), out.get("delay_per_s"))
    log(
        f"delay {out.get('delay_per_s', 0):,.0f}/s, emit to {SUBSCRIBERS} "
        f"{out.get('emit_per_s', 0):,.0f}/s, emit/delay {out['emit_per_delay'] or 0:.2f}"
    )
    return out


# -- 2. Redis commands per emit ---------------------------------------------------------------


def run_commands(ctx: Context, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Count the Redis commands of N ``emit()`` and N ``delay()`` calls."""
    import redis

    opts = ctx.opts
    url = BROKERS["redis"]
    tag = _tag(ctx, "redis", "cmds", rnd)
    db = int(urlsplit(url).path.strip("/") or 0)
    subscriber_queues, task_queue = emit_queues(tag)
    queues = [*subscriber_queues, task_queue]
    out: dict[str, Any] = {"broker": "redis", "phase": "commands", "round": rnd, "problems": []}
    app, one = make_emit_app(url, tag, exchange=f"{tag}-events", keyprefix=tag + ":")
    stats_client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        app.declare()
        app.declare_events()
        one.delay({"seq": -1})
        app.emit(EVENT, {"seq": -1})
        n = opts.count_events
        calls: dict[str, Callable[[int], Any]] = {
            "emit": lambda i: app.emit(EVENT, {"seq": i}),
            "delay": lambda i: one.delay({"seq": i}),
        }
        commandstats(stats_client)  # connects outside the counted window
        for which, call in calls.items():
            with Monitor(url, f"{tag}-{which}") as monitor:
                before = commandstats(stats_client)
                for i in range(n):
                    call(i)
                after = commandstats(stats_client)
                ports = own_ports(urlsplit(url).port or 6379)
            got = count_commands(monitor.lines, ports, tag, db)
            total = sum(got.values())
            out[f"{which}_commands_per_call"] = total / n
            out[f"{which}_commands"] = {k: v / n for k, v in sorted(got.items())}
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            delta["info"] = delta.get("info", 0) - 1  # the second INFO, ours
            out[f"{which}_server_commands_per_call"] = sum(v for v in delta.values() if v > 0) / n
            log(
                f"{which}: {total / n:.2f} commands per call ("
                + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(got.items()))
                + f"); whole server {out[f'{which}_server_commands_per_call']:.2f} per call"
            )
    finally:
        stats_client.close()
        _delete_queues(app, queues)
    return out


# -- 3. ordered tasks against plain ones ------------------------------------------------------


def _partition_queues(queue: str, partitions: int) -> list[str]:
    width = len(str(partitions - 1))
    return [f"{queue}.p{i:0{width}d}" for i in range(partitions)]


def _prefill(
    task: Any, n: int, keys: int, threads: int, base: int, deadline: float
) -> tuple[float, list[str]]:
    """Publish ``n`` tasks over ``keys`` keys from ``threads`` threads; a key stays in one
    thread, so that each key's tasks are published in ``seq`` order. Returns (seconds, errors).
    """
    errors: list[str] = []
    groups: list[list[int]] = [[] for _ in range(threads)]
    for k in range(n):
        groups[(k % keys) % threads].append(k)

    def run(seqs: list[int]) -> None:
        try:
            for count, k in enumerate(seqs):
                task.delay(k % keys, base + k, time.time())
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
    return time.perf_counter() - t0, errors


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


def run_ordered(
    broker: str, ctx: Context, rnd: int, variant: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Prefill N keyed tasks, then time their drain by ``mqtasks worker -p 2``."""
    opts = ctx.opts
    url = BROKERS[broker]
    ordered = variant == "ordered"
    tag = _tag(ctx, broker, variant, rnd)
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
        seconds, errors = _prefill(
            task, n, opts.keys, opts.publishers, base, time.monotonic() + opts.timeout
        )
        problems.extend(errors)
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
        _delete_queues(app, names)
        _sweep_redis(BACKEND_URL, tag)
    return out


# -- summary ---------------------------------------------------------------------------------


def summarise(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios (and their figures), per broker: each round's, their median, the target."""
    rows: list[dict[str, Any]] = []

    def row(
        broker: str, name: str, target: str, bound: float | None, how: str, values: list[float]
    ) -> None:
        value = _median(values)
        met = None
        if bound is not None and value is not None:
            met = value >= bound if how == "ge" else value <= bound
        rows.append(
            {
                "broker": broker,
                "ratio": name,
                "measured": value,
                "rounds": values,
                "target": target,
                "met": met,
            }
        )

    for broker in BROKERS:
        emits = [r for r in rounds if r["broker"] == broker and r["phase"] == "emit"]
        values = [r["emit_per_delay"] for r in emits if r.get("emit_per_delay")]
        if values:
            row(broker, f"emit() to {SUBSCRIBERS} / delay(), calls/s", ">= 0.8", 0.8, "ge", values)
        by_round: dict[int, dict[str, float]] = defaultdict(dict)
        for r in rounds:
            if r["broker"] == broker and r["phase"] in ("ordered", "plain") and "drain_per_s" in r:
                by_round[r["round"]][r["phase"]] = r["drain_per_s"]
        values = [v for d in by_round.values() if (v := _ratio(d.get("ordered"), d.get("plain")))]
        if values:
            row(broker, "ordered / plain, drain tasks/s", ">= 0.5", 0.5, "ge", values)
        busy: dict[int, dict[str, float]] = defaultdict(dict)
        for r in rounds:
            if r["broker"] == broker and "all_busy_per_s" in r:
                busy[r["round"]][r["phase"]] = r["all_busy_per_s"]
        values = [v for d in busy.values() if (v := _ratio(d.get("ordered"), d.get("plain")))]
        if values:
            row(broker, "the same, while every process ran", "(info)", None, "", values)
    cmds = [r for r in rounds if r["phase"] == "commands"]
    values = [r["emit_commands_per_call"] for r in cmds if "emit_commands_per_call" in r]
    if values:
        name = f"Redis commands per emit() to {SUBSCRIBERS}"
        row("redis", name, f"<= {COMMANDS_TARGET}", COMMANDS_TARGET, "le", values)
    return rows


def table(rounds: list[dict[str, Any]], opts: argparse.Namespace) -> str:
    lines: list[str] = []
    emits = [r for r in rounds if r["phase"] == "emit"]
    if emits:
        lines.append(
            f"emit() to {SUBSCRIBERS} subscribers against delay(), {opts.events} calls from one "
            "thread, each confirmed, calls/s"
        )
        lines.append(f"{'broker':7} {'round':>5} {'delay':>9} {'emit':>9} {'emit/delay':>11}")
        for r in emits:
            lines.append(
                f"{r['broker']:7} {r['round'] + 1:>5} {r.get('delay_per_s', 0):9,.0f} "
                f"{r.get('emit_per_s', 0):9,.0f} {r.get('emit_per_delay') or 0:11.2f}"
            )
        lines.append("")
    cmds = [r for r in rounds if r["phase"] == "commands"]
    if cmds:
        lines.append(
            f"Redis commands per call, {opts.count_events} calls (this process's connections "
            "and the commands of their scripts; whole server: every client)"
        )
        for r in cmds:
            for which in ("emit", "delay"):
                if f"{which}_commands_per_call" not in r:
                    continue
                detail = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{which}_commands"].items())
                lines.append(
                    f"  round {r['round'] + 1} {which:5} {r[f'{which}_commands_per_call']:5.2f}"
                    f"  ({detail}); whole server {r[f'{which}_server_commands_per_call']:.2f}"
                )
        lines.append("")
    keyed = [r for r in rounds if r["phase"] in ("ordered", "plain")]
    if keyed:
        lines.append(
            f"ordered tasks: {opts.ordered_tasks} no-op tasks over {opts.keys} keys, prefilled, "
            f"drained by mqtasks worker -c 8 -p {opts.processes}; ordered: {opts.partitions} "
            "partitions"
        )
        lines.append(
            f"{'broker':7} {'round':>5} {'variant':8} {'prefill/s':>10} {'drain/s':>9} "
            f"{'all busy':>9} "
            f"{'CPU µs/task':>12} {'ran':>6} {'early':>6} {'dup':>4}  "
            "per process: tasks (first-last start, s)"
        )
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
        lines.append(
            "  all busy: tasks/s while every worker process was running tasks (0: they "
            "did not overlap for 0.5 s)"
        )
        lines.append(
            "  ran: of the tasks published (a task dead-lettered, by the ordering's "
            "sequence checks for one, is missing); early: tasks that started before a task "
            "of their key published earlier (plain tasks have no order to keep)"
        )
        lines.append("")
    lines.append("targets: ratios within each round, their median")
    lines.append(f"{'broker':7} {'ratio':40} {'median':>7}  {'target':8} {'met':4} rounds")
    for row in summarise(rounds):
        met = row["met"]
        mark = "-" if met is None else ("yes" if met else "NO")
        each = " ".join(f"{v:.2f}" for v in row["rounds"])
        lines.append(
            f"{row['broker']:7} {row['ratio']:40} {row['measured']:7.2f}  "
            f"{row['target']:8} {mark:4} {each}"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.patterns",
        description="Messaging patterns: emit() against delay(), Redis commands per event, "
        "ordered tasks against plain ones, on the local RabbitMQ and Redis.",
    )
    p.add_argument("--brokers", default="amqp,redis", help="comma-separated: amqp,redis")
    p.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated: emit,commands,ordered"
    )
    p.add_argument("--repeat", type=int, default=2, help="rounds; medians reported (2)")
    p.add_argument("--events", type=int, default=3000, help="emit()/delay() calls timed (3000)")
    p.add_argument("--block", type=int, default=250, help="calls per turn of a side (250)")
    p.add_argument("--count-events", type=int, default=200, help="calls counted (200)")
    p.add_argument("--ordered-tasks", type=int, default=5000, help="tasks drained (5000)")
    p.add_argument("--keys", type=int, default=200, help="ordering keys (200)")
    p.add_argument("--partitions", type=int, default=16, help="partitions of the queue (16)")
    p.add_argument("--processes", type=int, default=2, help="worker processes (2)")
    p.add_argument("--publishers", type=int, default=8, help="prefill publisher threads (8)")
    p.add_argument(
        "--worker-log-level",
        default="warning",
        choices=["debug", "info", "warning"],
        help="the ordered benchmark's worker log level (warning); its log is kept with --keep",
    )
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per phase (180)")
    add_worker_options(p)
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    opts.phase_list = [s.strip() for s in opts.phases.split(",") if s.strip()]
    bad = [b for b in opts.broker_list if b not in BROKERS]
    bad += [s for s in opts.phase_list if s not in PHASES]
    if bad:
        p.error(f"unknown broker(s)/phase(s) {bad}")
    counts = (
        opts.repeat,
        opts.events,
        opts.block,
        opts.count_events,
        opts.ordered_tasks,
        opts.keys,
    )
    if min(*counts, opts.processes, opts.publishers) < 1 or not 1 <= opts.partitions <= 1024:
        p.error("counts must be at least 1, --partitions 1..1024")
    for url in [*BROKERS.values(), BACKEND_URL]:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("refusing a non-loopback broker")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Publishers log warnings and above, as the workers do (--log-level warning).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _interrupt)
    run_id = uuid.uuid4().hex[:8]
    run_dir = os.path.join(HERE, "results", f"run-{run_id}")
    os.makedirs(run_dir, exist_ok=True)
    ctx = Context(run_id, run_dir, opts)
    info, header = run_header(())
    print(header)
    print(
        f"run {run_id}: {opts.events} emit()/delay() calls, {opts.count_events} counted, "
        f"{opts.ordered_tasks} keyed tasks over {opts.keys} keys ({opts.partitions} partitions, "
        f"{opts.processes} worker processes), {opts.repeat} round(s); phases "
        f"{','.join(opts.phase_list)}",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    status = 0
    started = time.monotonic()
    try:
        for rnd in range(opts.repeat):
            for broker in opts.broker_list:
                for phase in opts.phase_list:
                    if phase == "commands" and broker != "redis":
                        continue
                    variants = ["emit"] if phase == "emit" else ["commands"]
                    if phase == "ordered":
                        # Alternate which goes first, so that drift hits both alike.
                        variants = ["ordered", "plain"] if rnd % 2 == 0 else ["plain", "ordered"]
                    for variant in variants:
                        prefix = f"[r{rnd + 1} {broker} {variant}]"

                        def log(msg: str, prefix: str = prefix) -> None:
                            print(f"  {prefix} {msg}", flush=True)

                        t = time.monotonic()
                        try:
                            if variant == "emit":
                                result = run_emit(broker, ctx, rnd, log)
                            elif variant == "commands":
                                result = run_commands(ctx, rnd, log)
                            else:
                                result = run_ordered(broker, ctx, rnd, variant, log)
                        except (KeyboardInterrupt, SystemExit):
                            raise
                        except Exception as exc:
                            result = {
                                "broker": broker,
                                "phase": variant,
                                "round": rnd,
                                "problems": [f"{exc!r}"],
                            }
                        result["seconds"] = round(time.monotonic() - t, 1)
                        rounds.append(result)
                        for problem in result["problems"]:
                            log(f"PROBLEM: {problem}")
    except KeyboardInterrupt:
        print("interrupted; stopping workers and deleting queues and keys", file=sys.stderr)
        status = 130
    except Exception as exc:
        traceback.print_exc()
        print(f"failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(ctx)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    wall = time.monotonic() - started
    print()
    print(f"{header}\nwall time {wall / 60:.1f} min\n")
    print(table(rounds, opts))
    print("\nConfigurations:")
    how = {
        "amqp": "quorum queues, publisher confirms (mqtasks' defaults)",
        "redis": "mqtasks' own redis://",
    }
    print_configs(
        {
            b: {
                "emit": f"one thread, each call confirmed; {how[b]}; no worker running",
                "ordered": f"mqtasks worker -c 8 -p {opts.processes}, acks late, {how[b]}; "
                f"backend {BACKEND_URL}; ignore_result on both tasks",
            }
            for b in opts.broker_list
        }
    )
    if opts.json:
        write_json(
            opts.json,
            {
                "run_id": run_id,
                "machine": info,
                "options": {k: v for k, v in vars(opts).items() if k != "json"},
                "wall_seconds": round(wall, 1),
                "targets": summarise(rounds),
                "rounds": rounds,
            },
        )
    problems = any(r["problems"] for r in rounds)
    if opts.keep or status or problems:
        print(f"records and worker logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if problems and status == 0:
        status = 2
    return status


def cleanup(ctx: Context) -> None:
    """Stop every worker; delete the run's queues and exchanges (RabbitMQ) and keys (Redis)."""
    for w in list(WorkerProcess.live):
        w.stop(grace=2.0)
    if "amqp" in ctx.opts.broker_list:
        _cleanup_amqp(ctx)
    prefix = f"bench-{ctx.run_id}"
    _sweep_redis(BROKERS["redis"], prefix)
    _sweep_redis(BACKEND_URL, prefix)


if __name__ == "__main__":
    sys.exit(main())
