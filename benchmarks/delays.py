"""Delays held by the broker: how late do countdown tasks start, and does holding
many of them cost the worker memory?

``--broker amqp`` (the local RabbitMQ, its delay ladder), ``redis`` (the local
Redis, db 10, mqtasks' ``redis://`` with a key prefix of its own) or ``memory``
(the in-process broker). On amqp and redis the worker is a separate process,
``python -m mqtasks worker -A benchmarks.delays`` (this module is its app,
configured from ``BENCH_DELAYS_*`` variables), so its RSS is its own; on
memory the broker lives in the worker's process, and so do held messages.

1. Memory: the worker's RSS while idle (sampled for ``--idle`` seconds), then
   ``--held`` tasks published with countdowns spread over ``--spread`` seconds
   (all due after the run ends) while it runs, and its peak RSS over the
   publishing and ``--watch`` more seconds.
2. Accuracy: ``--short`` tasks published one by one with a countdown drawn
   from ``--min``..``--max`` seconds; each task's error is its start time minus
   (publish time + countdown). Prints p50, p99 and max, and how many started
   early (must be 0).

Queues and keys are the run's own and deleted at the end. On amqp, held
messages wait in RabbitMQ's shared ``mqtasks.delay.*`` queues until due and
are then dropped, their queue being gone.

    python -m benchmarks.delays --broker redis
    python -m benchmarks.delays --broker amqp --held 20000 --spread 600
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqtasks import App
from mqtasks.worker import Worker

URLS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/10",
    "memory": "memory://",
}


#: The worker command line (this module is its app).
WORKER = [sys.executable, "-m", "mqtasks", "worker", "-A", "benchmarks.delays"]


def _record(tag: str, due: float) -> None:
    """Append ``tag due start`` to ``$BENCH_DELAYS_RECORD`` (one O_APPEND write)."""
    start = time.time()
    path = os.environ.get("BENCH_DELAYS_RECORD")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {due!r} {start!r}\n".encode())
    finally:
        os.close(fd)


def make_app(url: str, queue: str, key_prefix: str | None) -> App:
    """The benchmark app: ``bench.tick`` records its start, ``bench.held`` does nothing."""
    options = {"key_prefix": key_prefix} if key_prefix and url.startswith("redis") else {}
    app = App("bench", broker=url, default_queue=queue, transport_options=options)

    @app.task(name="bench.tick")
    def tick(tag: str, due: float) -> None:
        _record(tag, due)

    @app.task(name="bench.held")
    def held(n: int) -> None:
        return None

    return app


#: The app a worker subprocess loads (``-A benchmarks.delays``).
app = make_app(
    os.environ.get("BENCH_DELAYS_URL", "memory://"),
    os.environ.get("BENCH_DELAYS_QUEUE", "bench-delays"),
    os.environ.get("BENCH_DELAYS_PREFIX"),
)


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def read_record(path: Path) -> dict[str, tuple[float, float]]:
    """``tag -> (due, start)`` for every task that ran."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        tag, due, start = line.split()
        out[tag] = (float(due), float(start))
    return out


class Peak:
    """Samples a process's RSS every 0.1 s in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(0.1)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(record: Path, tags: set[str], timeout: float) -> dict[str, tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        got = read_record(record)
        if tags <= got.keys() or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(URLS), default="redis")
    parser.add_argument("--url", default=None, help="broker URL (default: the local one)")
    parser.add_argument("--held", type=int, default=20000)
    parser.add_argument("--spread", type=float, default=600.0)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--watch", type=float, default=10.0)
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--min", type=float, default=0.1)
    parser.add_argument("--max", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)

    url = args.url or URLS[args.broker]
    run = uuid.uuid4().hex[:8]
    queue = f"bench-delays-{run}"
    prefix = "{mqt-bench-delays-" + run + "}"
    workdir = Path(tempfile.mkdtemp(prefix="mqt-bench-delays-"))
    record = workdir / "record"
    os.environ["BENCH_DELAYS_RECORD"] = str(record)
    bench = make_app(url, queue, prefix)
    tick, held = bench.tasks["bench.tick"], bench.tasks["bench.held"]
    proc: subprocess.Popen[bytes] | None = None
    worker: Worker | None = None
    try:
        if args.broker == "memory":
            worker = Worker(bench, concurrency=args.concurrency)
            worker.start()
            pid = os.getpid()
        else:
            bench.declare([queue])
            env = {
                **os.environ,
                "BENCH_DELAYS_URL": url,
                "BENCH_DELAYS_QUEUE": queue,
                "BENCH_DELAYS_PREFIX": prefix,
            }
            with open(workdir / "worker.log", "wb") as log:
                proc = subprocess.Popen(
                    [*WORKER, "-c", str(args.concurrency), "--log-level", "warning"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            pid = proc.pid
        tick.delay("ready", time.time())
        if "ready" not in wait_for(record, {"ready"}, 60):
            raise SystemExit(f"the worker did not start; see {workdir / 'worker.log'}")

        # 1. memory: idle, then holding --held delayed tasks
        with Peak(pid) as idle:
            time.sleep(args.idle)
        t0 = time.monotonic()
        with Peak(pid) as holding:
            horizon = args.watch + args.short * 0.02 + args.max + 60
            for n in range(args.held):  # all due after the run ends
                held.apply_async((n,), countdown=horizon + args.spread * n / args.held)
            published = time.monotonic() - t0
            time.sleep(args.watch)
        counts: dict[str, Any] = bench.transport.delayed_counts([bench.queue(queue)])
        where = f"; the broker holds {counts[queue]}" if queue in counts else ""
        print(
            f"{args.broker}: published {args.held} tasks with countdowns spread over "
            f"{args.spread:.0f} s in {published:.1f} s{where}"
        )
        print(
            f"{args.broker}: worker RSS idle {idle.peak:.1f} MiB, peak while holding "
            f"{holding.peak:.1f} MiB (+{holding.peak - idle.peak:.1f})"
        )

        # 2. accuracy of short countdowns
        due: dict[str, float] = {}
        for i in range(args.short):
            countdown = random.uniform(args.min, args.max)
            sent = time.time()
            tick.apply_async((f"t{i}", sent + countdown), countdown=countdown)
            due[f"t{i}"] = sent + countdown
            time.sleep(random.uniform(0.0, 0.02))
        got = wait_for(record, set(due), args.max + 30)
        errors = [got[t][1] - got[t][0] for t in due if t in got]
        if not errors:
            raise SystemExit("no short countdown task ran")
        print(
            f"{args.broker}: {len(errors)}/{args.short} short countdowns "
            f"({args.min}-{args.max} s) started; error p50 "
            f"{statistics.median(errors) * 1000:.1f} ms, p99 {quantile(errors, 0.99) * 1000:.1f} ms, "
            f"max {max(errors) * 1000:.1f} ms, early {sum(e < 0 for e in errors)}"
        )
        print(json.dumps({"broker": args.broker, "idle_mib": idle.peak, "peak_mib": holding.peak}))
    finally:
        if worker is not None:
            worker.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _clean(bench, queue, prefix)
        bench.close()


def _clean(bench: App, queue: str, prefix: str) -> None:
    transport = bench.transport
    if bench.settings.broker_url.startswith("memory"):
        return
    if bench.settings.broker_url.startswith("redis"):
        client: Any = transport.publisher()  # type: ignore[attr-defined]
        keys = list(client.scan_iter(match=prefix.replace("{", "[{]").replace("}", "[}]") + "*"))
        if keys:
            client.delete(*keys)
        return
    transport.delete([bench.queue(queue), bench.queue(queue + ".dlq")])


if __name__ == "__main__":
    main()
