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
3. **ordered** (both brokers): the drain of N keyed tasks by ``mqtasks worker -p 2``,
   ordered by their key against the same task unordered (``benchmarks/ordered.py``).

Figures and ratios are printed, never asserted. Every queue, exchange and key of the run
carries the run's id and is deleted at the end, also after an error, Ctrl-C or SIGTERM.
Run ``python -m benchmarks.patterns --help``; see ``benchmarks/README.md`` ("Messaging
patterns").
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import structlog

from ._record import Log, measure, target_lines, target_row
from ._redis_commands import Monitor, commandstats, count_commands, own_ports
from ._systems import Context, add_worker_options
from ._workers import WorkerProcess
from .bench_patterns_app import EVENT, SUBSCRIBERS, emit_queues, make_emit_app
from .ordered import (
    BACKEND_URL,
    delete_queues,
    ordered_rows,
    ordered_table,
    ratio,
    run_ordered,
    run_tag,
)
from .suite import _cleanup_amqp, print_configs, run_header, write_json
from .throughput import BROKERS, _sweep_redis, bounded

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("emit", "commands", "ordered")
#: What an emit to three subscribers should cost on Redis: the EVALSHA, the HGETALL of the
#: bindings in its script, one LPUSH per subscriber queue.
COMMANDS_TARGET = 2 + SUBSCRIBERS


# -- small helpers ---------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- 1. emit() to three subscribers against delay() ------------------------------------------


def run_emit(broker: str, ctx: Context, rnd: int, log: Log) -> dict[str, Any]:
    """Time N confirmed ``emit()`` calls and N ``delay()`` calls from one thread."""
    opts = ctx.opts
    url = BROKERS[broker]
    tag = run_tag(ctx, broker, "emit", rnd)
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
        delete_queues(app, queues)
    out["emit_per_delay"] = ratio(out.get("emit_per_s"), out.get("delay_per_s"))
    log(
        f"delay {out.get('delay_per_s', 0):,.0f}/s, emit to {SUBSCRIBERS} "
        f"{out.get('emit_per_s', 0):,.0f}/s, emit/delay {out['emit_per_delay'] or 0:.2f}"
    )
    return out


# -- 2. Redis commands per emit ---------------------------------------------------------------


def run_commands(ctx: Context, rnd: int, log: Log) -> dict[str, Any]:
    """Count the Redis commands of N ``emit()`` and N ``delay()`` calls."""
    import redis

    opts = ctx.opts
    url = BROKERS["redis"]
    tag = run_tag(ctx, "redis", "cmds", rnd)
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
        delete_queues(app, queues)
    return out


# -- summary ---------------------------------------------------------------------------------


def summarise(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios (and their figures), per broker: each round's, their median, the target."""
    rows: list[dict[str, Any]] = []
    for broker in BROKERS:
        emits = [r for r in rounds if r["broker"] == broker and r["phase"] == "emit"]
        values = [r["emit_per_delay"] for r in emits if r.get("emit_per_delay")]
        if values:
            name = f"emit() to {SUBSCRIBERS} / delay(), calls/s"
            rows.append(target_row(broker, name, values, ">= 0.8", 0.8, "ge"))
        rows += ordered_rows(rounds, broker)
    cmds = [r for r in rounds if r["phase"] == "commands"]
    values = [r["emit_commands_per_call"] for r in cmds if "emit_commands_per_call" in r]
    if values:
        name = f"Redis commands per emit() to {SUBSCRIBERS}"
        rows.append(
            target_row("redis", name, values, f"<= {COMMANDS_TARGET}", COMMANDS_TARGET, "le")
        )
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
    lines += ordered_table(rounds, opts)
    lines += target_lines(summarise(rounds), width=40)
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


def run_phase(broker: str, ctx: Context, rnd: int, variant: str, log: Log) -> dict[str, Any]:
    """One measurement: ``emit``, ``commands``, or the ``ordered`` or ``plain`` drain."""
    if variant == "emit":
        return run_emit(broker, ctx, rnd, log)
    if variant == "commands":
        return run_commands(ctx, rnd, log)
    return run_ordered(broker, ctx, rnd, variant, log)


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
                        measure(
                            rounds,
                            rnd,
                            broker,
                            variant,
                            lambda log, v=variant, b=broker, r=rnd: run_phase(b, ctx, r, v, log),
                            kind="phase",
                        )
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
