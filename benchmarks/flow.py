"""Rate limits across workers: their accuracy, and what a limit costs when it is not reached.

Two measurements, each with fresh queues, keys and workers (``mqtasks worker -c 8``,
the suite's command line), the Redis result backend under a key prefix of the run's
own, and the suite's no-op task body (``record(seq, sent)``, ``benchmarks/_record.py``):

1. **accuracy** (per broker): ``bench.rated`` with ``rate_limit="50/s"``, a queue
   prefilled with 1.3 x 50 x ``--seconds`` calls, drained by 4 worker processes for
   ``--seconds`` (60 by default). Printed: the observed rate (starts in the
   ``--seconds`` after the first start, divided by the seconds) and the most starts in
   any one-second window. Targets: within 5 % of 50/s; no window above 60.
2. **overhead** (Redis broker): a prefilled queue of ``--tasks`` no-op calls drained by
   one worker, ``bench.free`` (no limit) then ``bench.limited``
   (``rate_limit="1000000/s"``, far above what a worker reaches), in the same round;
   the rate runs from the first task's start to the last's. Then a short run of
   ``bench.limited`` under Redis ``MONITOR`` counts the backend commands per task (those
   naming the run's backend key prefix). Targets: limited / free >= 0.8; <= 1 backend
   operation per task. Both tasks have ``ignore_result=True``: the backend sees only
   the limit.

``python -m benchmarks.flow [--seconds S] [--tasks N] [--brokers redis amqp]
[--skip accuracy|overhead]``. The workers load this module (``-A benchmarks.flow``),
whose app is built from ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_KEYPREFIX``,
``BENCH_BACKEND_PREFIX`` and ``BENCH_RECORD_DIR``. Every queue and key carries the
run's id and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from typing import Any

from ._record import Log, measure, record, target_lines, target_row
from .suite import Records, WorkerProcess, wait_count
from .throughput import BROKERS, _sweep_redis

__all__ = ["RATE", "build_app", "main", "max_in_window"]

#: The limit of the accuracy measurement, per second.
RATE = 50
#: The backend (and, for the Redis broker, the broker's database).
BACKEND_URL = BROKERS["redis"]
#: Worker processes of the accuracy measurement.
PROCESSES = 4
#: The worker's command line: the suite's (8 threads, warnings only).
WORKER_ARGV = [
    sys.executable, "-m", "mqtasks", "worker", "-A", "benchmarks.flow",
    "-c", "8", "--log-level", "warning", "--log-format", "console",
]  # fmt: skip


def build_app(env: dict[str, str] | None = None) -> Any:
    """The benchmark's app: ``bench.rated``, ``bench.limited`` and ``bench.free``."""
    from mqtasks import App

    env = dict(os.environ if env is None else env)
    url = env.get("BENCH_BROKER_URL", "memory://")
    keyprefix = env.get("BENCH_KEYPREFIX", "")
    options = {}
    if keyprefix and url.startswith("redis://"):
        options["key_prefix"] = keyprefix.rstrip(":")
    app = App(
        "bench-flow",
        broker=url,
        backend=BACKEND_URL,
        backend_key_prefix=env.get("BENCH_BACKEND_PREFIX", "bench-flow:"),
        default_queue=env.get("BENCH_QUEUE", "bench-flow"),
        transport_options=options,
    )

    @app.task(name="bench.rated", rate_limit=f"{RATE}/s", ignore_result=True)
    def rated(seq: int, sent: float) -> None:
        record(seq, sent)

    @app.task(name="bench.limited", rate_limit="1000000/s", ignore_result=True)
    def limited(seq: int, sent: float) -> None:
        record(seq, sent)

    @app.task(name="bench.free", ignore_result=True)
    def free(seq: int, sent: float) -> None:
        record(seq, sent)

    return app


_built: list[Any] = []


def __getattr__(name: str) -> Any:
    """``app`` (what ``-A benchmarks.flow`` loads), built on first use."""
    if name == "app":
        if not _built:
            _built.append(build_app())
        return _built[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` within any ``window`` seconds."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


class _Run:
    """One measurement's names, environment and app; deletes its queue and keys at the end."""

    def __init__(self, broker: str, name: str, run_dir: str) -> None:
        self.broker = broker
        self.tag = f"bench-flow-{uuid.uuid4().hex[:8]}-{name}"
        self.url = BROKERS[broker]
        self.record_dir = os.path.join(run_dir, self.tag)
        self.records = Records(self.record_dir)
        self.log_path = os.path.join(run_dir, self.tag)
        self.env = dict(os.environ)
        self.env.update(
            BENCH_BROKER_URL=self.url,
            BENCH_QUEUE=self.tag,
            BENCH_KEYPREFIX=self.tag + ":",
            BENCH_BACKEND_PREFIX=self.tag + ":backend:",
            BENCH_RECORD_DIR=self.record_dir,
            PYTHONUNBUFFERED="1",
        )
        for var in ("MQTASKS_BROKER_URL", "MQTASKS_BACKEND_URL", "MQTASKS_PREFETCH"):
            self.env.pop(var, None)
        self.app = build_app(self.env)
        self.app.declare()
        self.workers: list[WorkerProcess] = []

    def fill(self, task: str, n: int) -> None:
        send = self.app.tasks[task]
        with self.app.publishing():
            for seq in range(n):
                send.delay(seq, time.time())

    def start(self, processes: int) -> None:
        for i in range(processes):
            log = f"{self.log_path}-{len(self.workers)}-{i}.log"
            self.workers.append(WorkerProcess(WORKER_ARGV, self.env, log))

    def alive(self) -> bool:
        return all(w.alive() for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(grace=10.0)
        self.workers.clear()

    def close(self, problems: list[str]) -> None:
        self.stop()
        try:
            self.app.transport.delete([self.app.queue(self.tag)])
        except Exception as exc:  # reported, the run goes on
            problems.append(f"delete: {exc!r}")
        self.app.close()
        _sweep_redis(BACKEND_URL, self.tag)
        if self.broker == "redis":
            _sweep_redis(self.url, self.tag)


def run_accuracy(broker: str, seconds: float, run_dir: str, log: Log) -> dict[str, Any]:
    """4 worker processes drain ``bench.rated`` (50/s) for ``seconds``."""
    out: dict[str, Any] = {"broker": broker, "phase": "accuracy", "problems": []}
    run = _Run(broker, "accuracy", run_dir)
    try:
        run.fill("bench.rated", int(RATE * seconds * 1.3))
        run.start(PROCESSES)
        status, _ = wait_count(run.records, {}, 1, timeout=120, stall=120, alive=run.alive)
        if status != "ok":
            out["problems"].append(f"start: {status}\n{run.workers[0].tail()}")
            return out
        first = min(r[2] for r in run.records.read())
        time.sleep(max(0.0, first + seconds + 1.0 - time.time()))
        starts = sorted(r[2] for r in run.records.read() if r[2] < first + seconds)
        out["observed_per_s"] = len(starts) / seconds
        out["max_per_1s_window"] = max_in_window(starts)
        out["ran"] = len(starts)
        log(
            f"{len(starts)} runs in {seconds:g} s: {out['observed_per_s']:.2f}/s "
            f"(limit {RATE}/s); most in one second: {out['max_per_1s_window']}"
        )
    finally:
        run.close(out["problems"])
    return out


def _drain(run: _Run, task: str, n: int, timeout: float) -> tuple[float, list[str]]:
    """Prefill ``n`` calls of ``task``, drain them with one worker; the rate and problems."""
    run.fill(task, n)
    since = run.records.sizes()
    run.start(1)
    status, _ = wait_count(run.records, since, n, timeout=timeout, stall=30, alive=run.alive)
    problems = [] if status == "ok" else [f"{task}: {status}\n{run.workers[-1].tail()}"]
    run.stop()
    starts = sorted(r[2] for r in run.records.read(since))
    rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
    return rate, problems


def run_overhead(n: int, timeout: float, run_dir: str, log: Log) -> dict[str, Any]:
    """``bench.free`` then ``bench.limited``, drained by one worker; then ops per task."""
    from ._redis_commands import Monitor

    out: dict[str, Any] = {"broker": "redis", "phase": "overhead", "problems": []}
    run = _Run("redis", "overhead", run_dir)
    try:
        for task in ("bench.free", "bench.limited"):
            rate, problems = _drain(run, task, n, timeout)
            out[f"{task}_per_s"] = rate
            out["problems"] += problems
        free, limited = out["bench.free_per_s"], out["bench.limited_per_s"]
        out["ratio"] = limited / free if free else None
        counted = min(n, 500)
        backend_prefix = run.env["BENCH_BACKEND_PREFIX"]
        with Monitor(BACKEND_URL, run.tag) as monitor:
            _, problems = _drain(run, "bench.limited", counted, timeout)
        out["problems"] += problems
        ops = [
            c for c in monitor.lines if c["client_type"] == "tcp" and backend_prefix in c["command"]
        ]
        out["backend_ops_per_task"] = len(ops) / counted
        log(
            f"free {free:,.0f}/s, limited {limited:,.0f}/s: ratio {out['ratio']:.2f}; "
            f"backend operations per task {out['backend_ops_per_task']:.2f} "
            f"({len(ops)} for {counted} tasks, under MONITOR)"
        )
    finally:
        run.close(out["problems"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurements; print each, then the targets table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.flow", description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="accuracy: seconds measured")
    p.add_argument("--tasks", type=int, default=10_000, help="overhead: calls per variant")
    p.add_argument("--brokers", nargs="+", default=["redis", "amqp"], choices=sorted(BROKERS))
    p.add_argument("--skip", choices=["accuracy", "overhead"], action="append", default=[])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a drain may take")
    opts = p.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as run_dir:
        if "accuracy" not in opts.skip:
            for broker in opts.brokers:

                def accuracy(log: Log, broker: str = broker) -> dict[str, Any]:
                    return run_accuracy(broker, opts.seconds, run_dir, log)

                r = measure(rounds, 0, broker, "accuracy", accuracy)
                observed = [r["observed_per_s"] / RATE] if "observed_per_s" in r else []
                window = [float(r["max_per_1s_window"])] if "max_per_1s_window" in r else []
                rows.append(target_row(broker, "observed / 50/s", observed, "0.95-1.05", None, ""))
                if observed:
                    rows[-1]["met"] = 0.95 <= observed[0] <= 1.05
                rows.append(target_row(broker, "most runs in 1 s", window, "<= 60", 60, "le"))
        if "overhead" not in opts.skip:

            def overhead(log: Log) -> dict[str, Any]:
                return run_overhead(opts.tasks, opts.timeout, run_dir, log)

            r = measure(rounds, 0, "redis", "overhead", overhead)
            ratio = [r["ratio"]] if r.get("ratio") else []
            ops = [r["backend_ops_per_task"]] if "backend_ops_per_task" in r else []
            rows.append(target_row("redis", "limited / free, tasks/s", ratio, ">= 0.8", 0.8, "ge"))
            rows.append(target_row("redis", "backend ops per task", ops, "<= 1", 1.0, "le"))
    print(json.dumps(rounds, default=str))
    print("\n".join(target_lines(rows)))
    return 0 if all(row["met"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
