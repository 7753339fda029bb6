"""mqtasks on ``sqlite://``: throughput with 1 and 2 worker processes on one file, and
the latency from ``delay()`` to the task's start.

Usage::

    python -m benchmarks.sqlite --tasks 2000 --samples 200

Everything runs on a database file of the run's own in a temporary directory
(deleted at the end), with the transport's defaults (``synchronous=FULL``,
WAL) unless ``--synchronous`` says otherwise.

* **publish**: ``--tasks`` ``noop.delay(seq, sent)`` calls, one at a time from
  this process (each one committed transaction), then the same number with
  ``noop.map`` (one transaction).
* **drain**: 1, then 2 worker processes (``mqtasks worker -c 8``) are started
  on the loaded queue; from the first task's start to the last's, tasks per
  second and the workers' CPU per task.
* **latency, other process**: one idle worker process; this process publishes
  ``--samples`` tasks one at a time, each waited for (and a random pause of up
  to 20 ms) before the next; ``delay()`` to the task's start. The worker finds
  them by polling, with its sleep doubling up to ``max_poll_interval``, so
  the pauses (and the poll settings) decide the figure.
* **latency, same process**: the same with a worker in this process (its
  threads), which a publish wakes at once.

Figures go to ``benchmarks/README.md``; this machine's 2 shared cores make
them noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

from ._workers import Records, WorkerProcess, percentiles, tree_cpu_s, wait_count


def make_app(url: str, queue: str) -> tuple[Any, Any]:
    """The suite's benchmark app (``bench.noop``) on ``url``."""
    from .bench_mqtasks_app import make_app as make

    with warnings.catch_warnings():  # the module's own app registered the task name too
        warnings.simplefilter("ignore")
        return make(url, queue)


@contextlib.contextmanager
def workers(n: int, url: str, queue: str, record_dir: str, work: str) -> Iterator[list[Any]]:
    """Run ``n`` worker processes (``-c 8``) on ``queue``; stopped with SIGTERM at the end."""
    argv = [sys.executable, "-m", "mqtasks", "worker", "-A", "benchmarks.bench_mqtasks_app"]
    env = {
        **os.environ,
        "BENCH_BROKER_URL": url,
        "BENCH_QUEUE": queue,
        "BENCH_RECORD_DIR": record_dir,
    }
    procs = [
        WorkerProcess(
            [*argv, "-c", "8", "--log-level", "warning"],
            env,
            os.path.join(work, f"{queue}-{i}.log"),
        )
        for i in range(n)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def throughput(url: str, tasks: int, n_workers: int, work: str) -> dict[str, Any]:
    """Publish ``tasks`` (one by one, then in one ``map``), drain them with ``n_workers``."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    record_dir = os.path.join(work, queue)
    records = Records(record_dir)
    app, noop = make_app(url, queue)
    row: dict[str, Any] = {"workers": n_workers, "tasks": 2 * tasks}
    try:
        t0 = time.perf_counter()
        for seq in range(tasks):
            noop.delay(seq, time.time())
        row["delay_per_s"] = tasks / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        noop.starmap([(seq, time.time()) for seq in range(tasks, 2 * tasks)])
        row["map_per_s"] = tasks / (time.perf_counter() - t0)
        with workers(n_workers, url, queue, record_dir, work) as procs:
            alive = lambda: all(p.alive() for p in procs)  # noqa: E731
            status, _ = wait_count(records, {}, 1, timeout=60, stall=60, alive=alive)
            if status != "ok":
                row["problem"] = f"no task started ({status}): {procs[0].tail()}"
                return row
            first = records.count()
            cpu0 = sum(tree_cpu_s(p.pid) for p in procs)
            status, done = wait_count(records, {}, 2 * tasks, timeout=600, stall=30, alive=alive)
            cpu = sum(tree_cpu_s(p.pid) for p in procs) - cpu0
            starts = sorted(start for _, _, start in records.read())
            span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
            row["drain_per_s"] = (len(starts) - 1) / span if span > 0 else None
            row["worker_cpu_ms_per_task"] = cpu / (done - first) * 1000 if done > first else None
            seqs = [seq for seq, _, _ in records.read()]
            row["duplicates"] = len(seqs) - len(set(seqs))
            if status != "ok":
                row["problem"] = status
    finally:
        with contextlib.suppress(Exception):
            app.transport.delete([app.queue(queue)])
        app.close()
    return row


def _one_by_one(noop: Any, records: Records, samples: int) -> list[float]:
    """Publish ``samples`` tasks one at a time, each waited for; return the latencies (ms)."""
    for seq in range(samples):
        since = records.sizes()
        noop.delay(seq, time.time())
        status, _ = wait_count(records, since, 1, timeout=30, stall=30, poll=0.0005)
        if status != "ok":
            raise RuntimeError(f"sample {seq}: {status}")
        time.sleep(random.uniform(0, 0.02))
    return [(start - sent) * 1000 for _, sent, start in records.read()]


def latency_other_process(url: str, samples: int, work: str) -> dict[str, float]:
    """``delay()`` in this process to the start in an idle worker process."""
    queue = f"bench-lat-{uuid.uuid4().hex[:8]}"
    record_dir = os.path.join(work, queue)
    records = Records(record_dir)
    app, noop = make_app(url, queue)
    try:
        with workers(1, url, queue, record_dir, work) as procs:
            noop.delay(-1, time.time())  # the worker is up once its first task ran
            status, _ = wait_count(records, {}, 1, timeout=60, stall=60, alive=procs[0].alive)
            if status != "ok":
                raise RuntimeError(f"worker did not start: {procs[0].tail()}")
            since = records.sizes()
            _one_by_one(noop, records, samples)
            values = [(s - t) * 1000 for _, t, s in records.read(since)]
    finally:
        with contextlib.suppress(Exception):
            app.transport.delete([app.queue(queue)])
        app.close()
    return percentiles(values)


def latency_same_process(url: str, samples: int, work: str) -> dict[str, float]:
    """``delay()`` to the start in a worker of this process (woken by the publish)."""
    from mqtasks.testing import running_worker

    queue = f"bench-lat-{uuid.uuid4().hex[:8]}"
    record_dir = os.path.join(work, queue)
    os.environ["BENCH_RECORD_DIR"] = record_dir
    records = Records(record_dir)
    app, noop = make_app(url, queue)
    try:
        with running_worker(app, concurrency=8):
            values = _one_by_one(noop, records, samples)
    finally:
        with contextlib.suppress(Exception):
            app.transport.delete([app.queue(queue)])
        app.close()
    return percentiles(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tasks", type=int, default=2000, help="published one by one, and as many by map"
    )
    p.add_argument("--samples", type=int, default=200, help="latency samples per variant")
    p.add_argument("--synchronous", default="", help="PRAGMA synchronous (FULL by default)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-sqlite-")
    url = f"sqlite:///{work}/bench.db"
    if args.synchronous:
        url += f"?synchronous={args.synchronous}"
    rows: list[dict[str, Any]] = []
    latency: dict[str, dict[str, float]] = {}
    try:
        for n in (1, 2):
            row = throughput(url, args.tasks, n, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
        latency["other process"] = latency_other_process(url, args.samples, work)
        latency["same process"] = latency_same_process(url, args.samples, work)
        print(json.dumps(latency), flush=True)
    finally:
        for w in list(WorkerProcess.live):
            w.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'workers':<9}{'delay()/s':>11}{'map/s':>9}{'drain/s':>9}{'CPU ms/task':>13}{'dups':>6}"
    )
    for r in rows:
        print(
            f"{r['workers']:<9}{r.get('delay_per_s', 0):>11.0f}{r.get('map_per_s', 0):>9.0f}"
            f"{r.get('drain_per_s') or 0:>9.0f}{r.get('worker_cpu_ms_per_task') or 0:>13.2f}"
            f"{r.get('duplicates', 0):>6}"
        )
    print(f"\n{'delay() to start':<18}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}")
    for name, q in latency.items():
        print(f"{name:<18}{q['p50']:>8.1f}{q['p95']:>8.1f}{q['p99']:>8.1f}{q['max']:>8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"throughput": rows, "latency": latency}, fh, indent=2)
    return 0 if all("problem" not in r and not r.get("duplicates") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
