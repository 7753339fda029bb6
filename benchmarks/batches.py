"""Batch consumption against single tasks: the item rate of a prefilled queue's drain.

A queue is filled with N no-op calls, no worker running, then ``mqtasks worker -c 8``
(the suite's command line, one process, ``--prefetch 200``) drains it; the rate runs
from the first item's start to the last's (``benchmarks/_record.py``: every item
records its start, a batch's items when the function runs). Two variants on the same
broker, in the same round, each with a fresh worker and queue:

* ``single``: ``bench.single(seq, sent)``, one task per message;
* ``batch``: ``bench.batch`` with ``batch_size=100`` (``batch_wait`` 0.2 s), one item
  ``[seq, sent]`` per message, the function recording each item of its list.

Target: batch >= 3 x single, in items per second, on each broker.

``python -m benchmarks.batches [--tasks N] [--rounds R] [--brokers amqp redis]``.
The worker loads this module (``-A benchmarks.batches``), whose app is built from
``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_KEYPREFIX`` and ``BENCH_RECORD_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any

from ._record import Log, measure, record, target_lines, target_row
from .bench_patterns_app import _transport_options
from .suite import Records, WorkerProcess, mqtasks_worker_argv, wait_count
from .throughput import BROKERS, _sweep_redis

__all__ = ["BATCH_SIZE", "build_app", "main", "run_variant"]

#: Items per batch, and the seconds a partial batch waits.
BATCH_SIZE = 100
BATCH_WAIT = 0.2
#: The worker's prefetch: two batches.
PREFETCH = 2 * BATCH_SIZE


def build_app(env: dict[str, str] | None = None) -> Any:
    """The benchmark's app: ``bench.single`` and ``bench.batch``, on ``BENCH_QUEUE``."""
    from mqtasks import App

    env = dict(os.environ if env is None else env)
    url = env.get("BENCH_BROKER_URL", "memory://")
    app = App(
        "bench-batches",
        broker=url,
        default_queue=env.get("BENCH_QUEUE", "bench-batches"),
        transport_options=_transport_options(url, env.get("BENCH_KEYPREFIX", "")),
    )

    @app.task(name="bench.single")
    def single(seq: int, sent: float) -> None:
        record(seq, sent)

    @app.task(name="bench.batch", batch_size=BATCH_SIZE, batch_wait=BATCH_WAIT)
    def batch(items: list[list[float]]) -> None:
        for seq, sent in items:
            record(int(seq), sent)

    return app


_built: list[Any] = []


def __getattr__(name: str) -> Any:
    """``app`` (what ``-A benchmarks.batches`` loads), built on first use."""
    if name == "app":
        if not _built:
            _built.append(build_app())
        return _built[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_variant(
    broker: str, variant: str, n: int, run_dir: str, opts: argparse.Namespace, log: Log
) -> dict[str, Any]:
    """Prefill ``n`` calls of ``variant`` (single or batch), then time their drain."""
    tag = f"bench-batches-{uuid.uuid4().hex[:8]}-{variant}"
    url = BROKERS[broker]
    record_dir = os.path.join(run_dir, tag)
    records = Records(record_dir)
    env = dict(os.environ)
    env.update(
        BENCH_BROKER_URL=url,
        BENCH_QUEUE=tag,
        BENCH_KEYPREFIX=tag + ":",
        BENCH_RECORD_DIR=record_dir,
        PYTHONUNBUFFERED="1",
    )
    for name in ("MQTASKS_BROKER_URL", "MQTASKS_BACKEND_URL", "MQTASKS_PREFETCH"):
        env.pop(name, None)
    app = build_app(env)
    task = app.tasks[f"bench.{variant}"]
    out: dict[str, Any] = {"broker": broker, "phase": variant, "round": 0, "problems": []}
    worker: WorkerProcess | None = None
    try:
        app.declare()
        t0 = time.perf_counter()
        with app.publishing():
            for seq in range(n):
                if variant == "batch":
                    task.delay([seq, time.time()])
                else:
                    task.delay(seq, time.time())
        out["prefill_per_s"] = n / (time.perf_counter() - t0)
        argv = [*mqtasks_worker_argv("benchmarks.batches"), "--prefetch", str(PREFETCH)]
        worker = WorkerProcess(argv, env, os.path.join(run_dir, tag + ".log"))
        status, _ = wait_count(
            records, {}, n, timeout=opts.timeout, stall=opts.stall, alive=worker.alive
        )
        if status != "ok":
            out["problems"].append(f"drain: {status}\n{worker.tail()}")
        starts = sorted(r[2] for r in records.read())
        out["ran"] = len(starts)
        if len(starts) > 1:
            out["items_per_s"] = (len(starts) - 1) / (starts[-1] - starts[0])
        log(
            f"prefill {out['prefill_per_s']:,.0f}/s; drain {out.get('items_per_s', 0):,.0f} items/s"
        )
    finally:
        if worker is not None:
            out["worker_exit"] = worker.stop(grace=10.0)
        try:
            app.transport.delete([app.queue(tag)])
        except Exception as exc:  # reported, the run goes on
            out["problems"].append(f"delete: {exc!r}")
        app.close()
        if broker == "redis":
            _sweep_redis(url, tag)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the rounds; print each measurement, then the targets table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.batches", description=__doc__)
    p.add_argument("--tasks", type=int, default=20_000, help="calls per variant and round")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--brokers", nargs="+", default=["redis", "amqp"], choices=sorted(BROKERS))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a drain may take")
    p.add_argument("--stall", type=float, default=30.0, help="seconds without progress = stall")
    opts = p.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as run_dir:
        for rnd in range(opts.rounds):
            for broker in opts.brokers:
                for variant in ("single", "batch"):

                    def one(log: Log, broker: str = broker, variant: str = variant) -> Any:
                        return run_variant(broker, variant, opts.tasks, run_dir, opts, log)

                    result = measure(rounds, rnd, broker, variant, one)
                    result["round"] = rnd
    by: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in rounds:
        if "items_per_s" in r:
            by[(r["broker"], r["round"])][r["phase"]] = r["items_per_s"]
    rows = []
    for broker in opts.brokers:
        values = [
            d["batch"] / d["single"]
            for (b, _), d in sorted(by.items())
            if b == broker and d.get("single") and "batch" in d
        ]
        rows.append(target_row(broker, "batch / single, items/s", values, ">= 3", 3.0, "ge"))
    print(json.dumps(rounds, default=str))
    print("\n".join(target_lines(rows)))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
