"""Execution control: what ``async def`` tasks and time limits cost, and mqtasks' coroutine
tasks against taskiq's and arq's, on the local Redis (and RabbitMQ for mqtasks alone).

For every broker, round and system, with the suite's no-op task body
(``record(seq, sent)``, ``benchmarks/_record.py``):

1. **publish**: ``--calls`` tasks sent one call at a time from asyncio code, each call
   awaited before the next (mqtasks ``await task.adelay()``, taskiq ``await task.kiq()``,
   arq ``await pool.enqueue_job()``; mqtasks' sync variants: ``delay()``), then the rest of
   the N tasks with the system's bulk way (not timed), no worker running;
2. **drain**: the system's worker is started as a process (group) of its own and empties
   the queue; the rate runs from the first task's start to the last's, from the tasks'
   own records, as in the suite's drain; the worker's CPU time per task beside it.

The systems: ``mqtasks-sync`` (a plain no-op), ``mqtasks-async`` (the same as ``async
def``), ``mqtasks-sync-limits`` and ``mqtasks-async-limits`` (with ``soft_time_limit=25,
time_limit=30``), all run by the same worker command line (``mqtasks worker -c 8``, the
suite's), on both brokers; on Redis also ``taskiq`` (taskiq-redis's ``RedisStreamBroker``,
acks after the task), ``taskiq-list`` (its ``ListQueueBroker``: ``BRPOP``, no acks),
``arq`` (its defaults) and ``arq-tuned`` (polling every 10 ms, 100 jobs at once), one
worker process each. The order rotates every round. The ratios (each within
its round, then the median): async / sync, limits on / off, mqtasks-async / each peer.

Figures and ratios are printed, never asserted. Every queue and key of the run carries the
run's id and is deleted at the end, also after an error, Ctrl-C or SIGTERM. Run ``python -m
benchmarks.execution --help``; see ``benchmarks/README.md`` ("Execution control").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import structlog

from ._systems import Context, _bin, add_worker_options, mqtasks_worker_argv
from ._workers import Records, WorkerProcess, tree_cpu_s, wait_count
from .suite import _cleanup_amqp, print_configs, run_header, write_json
from .throughput import BROKERS, _sweep_redis, bounded

HERE = os.path.dirname(os.path.abspath(__file__))
#: Seq of the warm-up task each publisher sends first (connects, declares); drained too.
WARM = -1
#: The ratios reported: name -> (numerator system, denominator system).
RATIOS = {
    "async / sync": ("mqtasks-async", "mqtasks-sync"),
    "sync, limits on / off": ("mqtasks-sync-limits", "mqtasks-sync"),
    "async, limits on / off": ("mqtasks-async-limits", "mqtasks-async"),
    "mqtasks-async / taskiq": ("mqtasks-async", "taskiq"),
    "mqtasks-async / taskiq-list": ("mqtasks-async", "taskiq-list"),
    "mqtasks-async / arq": ("mqtasks-async", "arq"),
    "mqtasks-async / arq-tuned": ("mqtasks-async", "arq-tuned"),
}
#: What each ratio should reach (the issue's targets); the peers': mqtasks at least as fast.
TARGETS = {
    "async / sync": 0.9,
    "sync, limits on / off": 0.9,
    "async, limits on / off": 0.9,
    "mqtasks-async / taskiq": 1.0,
    "mqtasks-async / taskiq-list": 1.0,
    "mqtasks-async / arq": 1.0,
    "mqtasks-async / arq-tuned": 1.0,
}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
    """Run ``coro`` on a fresh event loop in this thread, for at most ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def fill_async(
    send: Callable[[int, float], Awaitable[Any]], n: int, calls: int, batch: int
) -> float:
    """Send the warm-up task, then ``n`` tasks with ``send(seq, sent)``: the first ``calls``
    awaited one at a time (timed), the rest ``batch`` at a time awaited together; return
    the timed calls' rate per second."""
    await send(WARM, time.time())
    t0 = time.perf_counter()
    for seq in range(calls):
        await send(seq, time.time())
    seconds = time.perf_counter() - t0
    for start in range(calls, n, batch):
        sent = time.time()
        await asyncio.gather(*(send(seq, sent) for seq in range(start, min(n, start + batch))))
    return calls / seconds if seconds > 0 else 0.0


# -- the systems -----------------------------------------------------------------------------


class System:
    """One system on one broker: how to fill its queue, and how to start its worker."""

    name = ""
    brokers: tuple[str, ...] = ("redis",)
    config = ""

    def __init__(self, broker: str, ctx: Context, rnd: int) -> None:
        self.broker = broker
        self.url = BROKERS[broker]
        self.ctx = ctx
        self.queue = f"bench-{ctx.run_id}-{broker}-{self.name}-r{rnd}"
        self.keyprefix = f"{self.queue}:"

    def fill(self, n: int, calls: int, batch: int) -> float:
        """Publish ``n`` tasks (the warm-up one first), the first ``calls`` of them one
        call at a time; return those calls' rate per second."""
        raise NotImplementedError

    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENCH_BROKER_URL=self.url,
            BENCH_QUEUE=self.queue,
            BENCH_RECORD_DIR=record_dir,
            BENCH_KEYPREFIX=self.keyprefix,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")])
            ),
        )
        env.pop("MQTASKS_BROKER_URL", None)
        return env

    def close(self) -> None:
        """Delete what the system made on the broker that the run's sweep does not."""


class MqtasksSystem(System):
    """An mqtasks variant of :mod:`benchmarks.bench_execution_app`."""

    name = "mqtasks-sync"
    brokers = ("redis", "amqp")
    variant = "sync"

    @property
    def config(self) -> str:  # type: ignore[override]
        limits = ", soft_time_limit=25, time_limit=30" if "limits" in self.variant else ""
        kind = "async def" if "async" in self.variant else "def"
        transport = "quorum queue, confirms on" if self.broker == "amqp" else "mqtasks' redis://"
        return f"{kind} no-op{limits}; mqtasks worker -c 8 (1 process, prefetch 16), {transport}"

    def fill(self, n: int, calls: int, batch: int) -> float:
        from mqtasks.transport.queue import DLQ_SUFFIX

        from .bench_execution_app import make_app

        self.app, tasks = make_app(self.url, self.queue, keyprefix=self.keyprefix)
        if self.variant not in tasks:
            raise RuntimeError(f"this mqtasks refuses async def tasks: no {self.variant} variant")
        if self.broker == "amqp":
            self.ctx.amqp_queues.update({self.queue, self.queue + DLQ_SUFFIX})
        self.app.declare()
        task = tasks[self.variant]
        if "async" in self.variant:
            return float(_run(fill_async(task.adelay, n, calls, batch), self.ctx.opts.timeout))
        task.delay(WARM, time.time())
        t0 = time.perf_counter()
        for seq in range(calls):
            task.delay(seq, time.time())
        seconds = time.perf_counter() - t0
        for start in range(calls, n, batch):
            sent = time.time()
            task.starmap([(seq, sent) for seq in range(start, min(n, start + batch))])
        return calls / seconds if seconds > 0 else 0.0

    def worker_argv(self) -> list[str]:
        return mqtasks_worker_argv("benchmarks.bench_execution_app")

    def close(self) -> None:
        app = getattr(self, "app", None)
        if app is not None:
            if self.broker == "amqp":
                with contextlib.suppress(Exception):
                    bounded(lambda: app.transport.delete([app.queue(self.queue)]), 30, "delete")
            bounded(app.close, 30, "app.close")


class MqtasksAsync(MqtasksSystem):
    name = "mqtasks-async"
    variant = "async"


class MqtasksSyncLimits(MqtasksSystem):
    name = "mqtasks-sync-limits"
    variant = "sync-limits"


class MqtasksAsyncLimits(MqtasksSystem):
    name = "mqtasks-async-limits"
    variant = "async-limits"


class TaskiqSystem(System):
    """taskiq with taskiq-redis (:mod:`benchmarks.bench_taskiq_app`)."""

    name = "taskiq"
    kind = "stream"

    @property
    def config(self) -> str:  # type: ignore[override]
        how = (
            "RedisStreamBroker (XREADGROUP, XACK after the task)"
            if self.kind == "stream"
            else "ListQueueBroker (BRPOP, no acks)"
        )
        return f"taskiq worker --workers 1 --ack-type when_executed (max 100 async tasks), {how}"

    def fill(self, n: int, calls: int, batch: int) -> float:
        from .bench_taskiq_app import make_broker

        async def go() -> float:
            broker = make_broker(self.url, self.queue, self.kind)
            task = broker.find_task("bench.noop")
            assert task is not None
            await broker.startup()
            try:
                return await fill_async(task.kiq, n, calls, batch)
            finally:
                await broker.shutdown()

        return float(_run(go(), self.ctx.opts.timeout))

    def worker_argv(self) -> list[str]:
        return [
            _bin("taskiq"), "worker", "benchmarks.bench_taskiq_app:broker", "--workers", "1",
            "--ack-type", "when_executed", "--log-level", "WARNING",
        ]  # fmt: skip

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_TASKIQ_BROKER"] = self.kind
        return env


class TaskiqListSystem(TaskiqSystem):
    name = "taskiq-list"
    kind = "list"


class ArqSystem(System):
    """arq (:mod:`benchmarks.bench_arq_app`)."""

    name = "arq"
    config = "arq worker (1 process, max_jobs 10, poll 0.5 s), keep_result=0, JSON job data"

    def fill(self, n: int, calls: int, batch: int) -> float:
        from arq.connections import RedisSettings, create_pool

        from .bench_arq_app import dumps, loads

        async def go() -> float:
            pool = await create_pool(
                RedisSettings.from_dsn(self.url),
                job_serializer=dumps,
                job_deserializer=loads,
                default_queue_name=self.queue,
            )
            q = self.queue

            def send(seq: int, sent: float) -> Awaitable[Any]:
                job_id = f"{q}:{'warm' if seq == WARM else seq}"
                return pool.enqueue_job("bench.noop", seq, sent, _job_id=job_id)

            try:
                return await fill_async(send, n, calls, batch)
            finally:
                await pool.aclose()

        return float(_run(go(), self.ctx.opts.timeout))

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_arq_app"]


class ArqTunedSystem(ArqSystem):
    """arq polling every 10 ms, up to 100 jobs at once."""

    name = "arq-tuned"
    config = "arq worker (1 process, max_jobs 100, poll 0.01 s), keep_result=0, JSON job data"

    def worker_env(self, record_dir: str) -> dict[str, str]:
        env = super().worker_env(record_dir)
        env["BENCH_ARQ_TUNED"] = "1"
        return env


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        MqtasksSystem,
        MqtasksAsync,
        MqtasksSyncLimits,
        MqtasksAsyncLimits,
        TaskiqSystem,
        TaskiqListSystem,
        ArqSystem,
        ArqTunedSystem,
    )
}


# -- one system, one round ----------------------------------------------------------------------


def run_one(system: System, rnd: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Fill the system's queue, then drain it with a fresh worker; return the figures."""
    opts = system.ctx.opts
    n = opts.tasks
    out: dict[str, Any] = {
        "broker": system.broker,
        "system": system.name,
        "round": rnd,
        "problems": [],
    }
    problems: list[str] = out["problems"]
    tag = f"{system.broker}-{system.name}-r{rnd}"
    record_dir = os.path.join(system.ctx.run_dir, tag)
    records = Records(record_dir)
    out["publish_per_s"] = system.fill(n, min(opts.calls, n), opts.batch)
    log(f"publish {out['publish_per_s']:,.0f}/s (one call at a time, {min(opts.calls, n)} calls)")
    worker = WorkerProcess(
        system.worker_argv(),
        system.worker_env(record_dir),
        os.path.join(system.ctx.run_dir, f"{tag}.log"),
    )
    try:
        status, _ = wait_count(
            records, {}, 1, timeout=opts.startup, stall=opts.startup, alive=worker.alive
        )
        if status != "ok":
            raise RuntimeError(f"worker did not start a task: {status}\n{worker.tail()}")
        cpu0, seen0 = tree_cpu_s(worker.pid), records.count()
        status, got = wait_count(
            records, {}, n + 1, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
        )
        cpu1 = tree_cpu_s(worker.pid)
        if status != "ok":
            problems.append(f"drain: {status}")
        recs = records.read()
        starts = sorted(r[2] for r in recs)
        if len(starts) > 1 and starts[-1] > starts[0]:
            out["drain_per_s"] = (len(starts) - 1) / (starts[-1] - starts[0])
        if got > seen0:
            out["worker_cpu_us_per_task"] = (cpu1 - cpu0) / (got - seen0) * 1e6
        dup = len(recs) - len({r[0] for r in recs})
        if dup:
            out["duplicates"] = dup
        log(
            f"drain {out.get('drain_per_s', 0):,.0f}/s, worker CPU "
            f"{out.get('worker_cpu_us_per_task', 0):,.0f} µs/task ({status})"
        )
    finally:
        out["worker_exit"] = worker.stop(grace=opts.grace)
        if problems:
            out["worker_log_tail"] = worker.tail()
    return out


# -- summary ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(rounds: list[dict[str, Any]], brokers: list[str]) -> dict[str, Any]:
    """Medians per broker and system, and each ratio within its round, then their median."""
    figures: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, dict[str, Any]]] = {}
    for broker in brokers:
        mine = [r for r in rounds if r["broker"] == broker]
        per: dict[str, dict[str, float | None]] = {}
        for name in dict.fromkeys(r["system"] for r in mine):
            rs = [r for r in mine if r["system"] == name]
            per[name] = {
                key: _median([r[key] for r in rs if r.get(key)])
                for key in ("publish_per_s", "drain_per_s", "worker_cpu_us_per_task")
            }
        figures[broker] = per
        ratios[broker] = {}
        for label, (a, b) in RATIOS.items():
            drain, cpu = [], []
            for rnd in sorted({r["round"] for r in mine}):
                x = next((r for r in mine if (r["system"], r["round"]) == (a, rnd)), {})
                y = next((r for r in mine if (r["system"], r["round"]) == (b, rnd)), {})
                if x.get("drain_per_s") and y.get("drain_per_s"):
                    drain.append(x["drain_per_s"] / y["drain_per_s"])
                # CPU per task, inverted: the throughput ratio of a worker held by its CPU,
                # steadier than the rates when other jobs share the machine.
                if x.get("worker_cpu_us_per_task") and y.get("worker_cpu_us_per_task"):
                    cpu.append(y["worker_cpu_us_per_task"] / x["worker_cpu_us_per_task"])
            if drain:
                ratios[broker][label] = {
                    "median": statistics.median(drain),
                    "rounds": drain,
                    "cpu_median": _median(cpu),
                    "cpu_rounds": cpu,
                    "target": TARGETS[label],
                }
    return {"figures": figures, "ratios": ratios}


def table(summary: dict[str, Any], head: str) -> str:
    """The markdown tables: figures per broker and system, then the ratios."""
    lines = [
        head,
        "",
        "| broker | system | publish/s, one call at a time | drain/s | worker CPU µs/task |",
    ]
    lines.append("|---|---|---:|---:|---:|")
    for broker, per in summary["figures"].items():
        for name, f in per.items():
            cells = [
                "" if f[k] is None else f"{f[k]:,.0f}"
                for k in ("publish_per_s", "drain_per_s", "worker_cpu_us_per_task")
            ]
            lines.append(f"| {broker} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| broker | ratio | drain/s: median | rounds | by CPU/task: median | rounds | target |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for broker, rs in summary["ratios"].items():
        for label, r in rs.items():
            each = " ".join(f"{x:.2f}" for x in r["rounds"])
            by_cpu = " ".join(f"{x:.2f}" for x in r["cpu_rounds"])
            mark = "" if r["median"] >= r["target"] else " (below)"
            cpu = "" if r["cpu_median"] is None else f"{r['cpu_median']:.2f}"
            lines.append(
                f"| {broker} | {label} | {r['median']:.2f}{mark} | {each} | {cpu} | {by_cpu} "
                f"| ≥ {r['target']:g} |"
            )
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.execution",
        description="async def tasks and time limits against plain tasks; mqtasks against "
        "taskiq and arq on Redis.",
    )
    p.add_argument("--tasks", type=int, default=10_000, help="tasks drained per system (10000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (3)")
    p.add_argument("--brokers", default="redis,amqp", help="comma-separated: redis,amqp")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}"
    )
    p.add_argument("--calls", type=int, default=1000, help="publishes timed one at a time (1000)")
    p.add_argument("--batch", type=int, default=100, help="tasks per bulk publish, untimed (100)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per phase (180)")
    add_worker_options(p)
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    opts.system_list = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [b for b in opts.broker_list if b not in BROKERS]
    bad += [s for s in opts.system_list if s not in SYSTEMS]
    if bad:
        p.error(f"unknown broker(s)/system(s) {bad}")
    if min(opts.tasks, opts.repeat, opts.calls, opts.batch) < 1:
        p.error("--tasks, --repeat, --calls and --batch must be at least 1")
    for url in BROKERS.values():
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("refusing a non-loopback broker")
    return opts


def cleanup(ctx: Context) -> None:
    """Delete the run's RabbitMQ queues and every Redis key carrying its id (the peers'
    job and lock keys name the run's queue after a prefix of their own)."""
    if "amqp" in ctx.opts.broker_list:
        _cleanup_amqp(ctx)
    if "redis" in ctx.opts.broker_list:
        for prefix in ("bench-", "arq:job:bench-", "arq:in-progress:bench-", "arq:retry:bench-"):
            _sweep_redis(BROKERS["redis"], f"{prefix}{ctx.run_id}")
        _sweep_redis(BROKERS["redis"], f"arq:result:bench-{ctx.run_id}")
        _sweep_redis(BROKERS["redis"], f"autoclaim:bench-{ctx.run_id}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, _interrupt)
    run_id = uuid.uuid4().hex[:8]
    run_dir = os.path.join(HERE, "results", f"exec-{run_id}")
    os.makedirs(run_dir, exist_ok=True)
    ctx = Context(run_id, run_dir, opts)
    info, _ = run_header(("taskiq", "taskiq-redis", "arq"))
    # A run from a `git archive` of a commit (no .git there) names it in BENCH_COMMIT.
    info["commit"] = info.get("commit") or os.environ.get("BENCH_COMMIT")
    header = (
        f"mqtasks {info['mqtasks']} (commit {info['commit']}) | taskiq {info.get('taskiq')} | "
        f"taskiq-redis {info.get('taskiq-redis')} | arq {info.get('arq')} | kombu "
        f"{info['kombu']} | Python {info['python']} | RabbitMQ {info.get('rabbitmq', '?')} | "
        f"Redis {info.get('redis_server', '?')} | nproc {info['nproc']} | load at start "
        f"{info['loadavg']}"
    )
    print(header)
    print(
        f"run {run_id}: {opts.tasks} tasks, {opts.repeat} round(s), {opts.calls} timed publishes; "
        f"systems {','.join(opts.system_list)}",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    configs: dict[str, dict[str, str]] = {}
    status = 0
    started = time.monotonic()
    try:
        for rnd in range(opts.repeat):
            for broker in opts.broker_list:
                names = [s for s in opts.system_list if broker in SYSTEMS[s].brokers]
                k = rnd % len(names) if names else 0
                for name in names[k:] + names[:k]:
                    system = SYSTEMS[name](broker, ctx, rnd)
                    configs.setdefault(broker, {})[name] = system.config
                    prefix = f"[r{rnd + 1} {broker} {name}]"

                    def log(msg: str, prefix: str = prefix) -> None:
                        print(f"  {prefix} {msg}", flush=True)

                    t = time.monotonic()
                    try:
                        result = run_one(system, rnd, log)
                    except Exception as exc:  # one system's failure is not the run's
                        result = {
                            "broker": broker,
                            "system": name,
                            "round": rnd,
                            "problems": [f"failed: {exc!r}"],
                        }
                    finally:
                        try:
                            system.close()
                        except Exception as exc:
                            print(f"warning: closing {name} on {broker}: {exc!r}", file=sys.stderr)
                    result["seconds"] = round(time.monotonic() - t, 1)
                    rounds.append(result)
                    for problem in result["problems"]:
                        log(f"PROBLEM: {problem}")
    except KeyboardInterrupt:
        print("interrupted; stopping workers and deleting queues", file=sys.stderr)
        status = 130
    except Exception as exc:
        traceback.print_exc()
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup
        for w in list(WorkerProcess.live):
            w.stop(grace=2.0)
        cleanup(ctx)
        signal.signal(signal.SIGTERM, _interrupt)
    wall = time.monotonic() - started
    summary = summarise(rounds, opts.broker_list)
    head = f"{header}\n\n{opts.tasks} tasks per drain, wall time {wall / 60:.1f} min."
    text = table(summary, head)
    print()
    print(text)
    print("Configurations:")
    print_configs(configs)
    if opts.json:
        doc = {
            "run_id": run_id,
            "machine": info,
            "options": {k: v for k, v in vars(opts).items() if k != "json"},
            "wall_seconds": round(wall, 1),
            "configs": configs,
            "summary": summary,
            "rounds": rounds,
        }
        write_json(opts.json, doc)
    if opts.keep or status:
        print(f"records and worker logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if any(r["problems"] for r in rounds) and status == 0:
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
