"""mqtasks on ``postgresql://`` against procrastinate on the same PostgreSQL server, and
against mqtasks on ``redis://``, interleaved in one run.

Usage::

    python -m benchmarks.postgres_broker --tasks 2000 --rounds 3 [--json PATH]

Three systems, each with one worker process running 8 tasks at once and the same no-op
task body (``benchmarks/_record.py``):

* **mqtasks-pg**: ``postgresql://postgres@127.0.0.1:5432/test`` with a table prefix of
  the run's own (its tables dropped at the end); ``mqtasks worker -c 8`` (threads).
* **procrastinate**: its schema applied to a database created for the run
  (``bench_procrastinate_<id>`` on the same server, dropped at the end); an ``async``
  task, ``App.run_worker(concurrency=8)`` (asyncio), LISTEN/NOTIFY on, jobs kept
  (its defaults).
* **mqtasks-redis**: ``redis://127.0.0.1:6379/10`` with a key prefix of the run's own
  (swept at the end); ``mqtasks worker -c 8``.

Each round runs every system once, in an order rotated per round. For each:

* **pipeline**: the worker is started and warmed up by one task; ``--publishers``
  threads then publish ``--tasks`` tasks while it consumes; tasks per second from the
  first publish to the last task's start, and the worker's CPU per task;
* **latency**: on the now idle worker, ``--samples`` tasks one at a time (the next sent
  once the previous one started, after a random 1-5 ms pause): ``delay()``/``defer()``
  to the task's start, p50 and p99 (the rows also give the maximum and how many samples
  took over 100 ms: a wake-up missed waits for the next poll).

The table shows each system's median over the rounds and the ratios mqtasks-pg /
procrastinate and mqtasks-pg / mqtasks-redis (the median of the per-round ratios).
procrastinate is imported only here; it is in the ``bench`` extra. The machine's 2
shared cores carry the brokers and other work too: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ._record import record
from ._workers import Records, WorkerProcess, percentiles, tree_cpu_s, wait_count
from .throughput import _sweep_redis, machine_info

#: The server of both PostgreSQL systems; ``test`` is the database mqtasks-pg uses.
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/10"
SYSTEMS = ("mqtasks-pg", "procrastinate", "mqtasks-redis")
#: Tasks in flight per worker, the same for every system.
CONCURRENCY = 8

Send = Callable[[int, float], None]


# -- procrastinate ------------------------------------------------------------------------


def procrastinate_app(dsn: str, queue: str) -> tuple[Any, Any]:
    """A procrastinate app on ``dsn`` and its no-op task ``bench.noop`` on ``queue``."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    # Async: procrastinate's worker is asyncio, and a sync task would go through a thread.
    @app.task(name="bench.noop", queue=queue)
    async def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    return app, noop


def run_procrastinate_worker() -> None:
    """The procrastinate worker process (``--procrastinate-worker``); env as the suite's."""
    app, _ = procrastinate_app(os.environ["BENCH_PG_DSN"], os.environ["BENCH_QUEUE"])
    app.run_worker(queues=[os.environ["BENCH_QUEUE"]], concurrency=CONCURRENCY)


# -- the systems -------------------------------------------------------------------------


class System:
    """One system: its publishing side in this process and its worker's command line."""

    def __init__(self, name: str, run_id: str, work: str) -> None:
        self.name = name
        self.work = work
        self.queue = f"bench-{run_id}"
        self.env: dict[str, str] = {"BENCH_QUEUE": self.queue}
        self.app: Any = None
        self.task: Any = None
        self.send: Send
        self.cleanup: Callable[[], None] = lambda: None
        if name == "procrastinate":
            self.dsn = f"{PG_SERVER}/bench_procrastinate_{run_id}"
            self.env["BENCH_PG_DSN"] = self.dsn
            # Imported, not run as __main__, where procrastinate warns its app cannot be found.
            code = "from benchmarks.postgres_broker import run_procrastinate_worker as run; run()"
            self.argv = [sys.executable, "-c", code]
        else:
            from .bench_mqtasks_app import make_app

            if name == "mqtasks-pg":
                self.url = f"{PG_SERVER}/test?table_prefix=bench_{run_id}_"
                keyprefix = ""
            else:
                self.url, keyprefix = REDIS_URL, f"bench-{run_id}:"
                self.env["BENCH_KEYPREFIX"] = keyprefix
            self.env["BENCH_BROKER_URL"] = self.url
            self.app, self.task = make_app(self.url, self.queue, keyprefix=keyprefix)
            self.send = self.task.delay
            self.argv = [sys.executable, "-m", "mqtasks", "worker"]
            self.argv += ["-A", "benchmarks.bench_mqtasks_app", "-c", str(CONCURRENCY)]
            self.argv += ["--log-level", "warning"]

    def setup(self) -> None:
        """Create what the system needs on its broker (procrastinate: database and schema)."""
        if self.name != "procrastinate":
            return
        import psycopg

        # This side only defers: procrastinate's warning that an app made in __main__
        # cannot be found by its worker does not apply (the worker imports this module).
        logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
        dbname = self.dsn.rsplit("/", 1)[1]
        with psycopg.connect(f"{PG_SERVER}/test", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        self.cleanup = lambda: _drop_database(dbname)
        self.app, self.task = procrastinate_app(self.dsn, self.queue)
        self.app.open()
        self.app.schema_manager.apply_schema()
        task = self.task
        self.send = lambda seq, sent: task.defer(seq=seq, sent=sent)

    def close(self) -> None:
        """Close the publishing side and delete what the run left on the broker."""
        if self.name == "mqtasks-pg":
            with contextlib.suppress(Exception):
                self.app.transport.drop_table()
        elif self.name == "mqtasks-redis":
            with contextlib.suppress(Exception):
                self.app.transport.delete([self.app.queue(self.queue)])
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.app.close()
        if self.name == "mqtasks-redis":
            _sweep_redis(REDIS_URL, self.env["BENCH_KEYPREFIX"])
        self.cleanup()

    def worker(self, record_dir: str) -> WorkerProcess:
        env = {**os.environ, **self.env, "BENCH_RECORD_DIR": record_dir}
        log = os.path.join(self.work, f"{os.path.basename(record_dir)}.log")
        return WorkerProcess(self.argv, env, log)


def _drop_database(dbname: str) -> None:
    import psycopg

    try:
        with psycopg.connect(f"{PG_SERVER}/test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    except Exception as exc:
        print(f"  warning: could not drop database {dbname}: {exc!r}", file=sys.stderr)


# -- one round of one system -------------------------------------------------------------


def publish(send: Send, count: int, threads: int, base: int) -> tuple[float, list[str]]:
    """Publish ``count`` tasks from ``threads`` threads; return (t0 wall time, errors)."""
    errors: list[str] = []
    shares = [count // threads + (i < count % threads) for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def run(first: int, share: int) -> None:
        try:
            barrier.wait(30)
            for seq in range(first, first + share):
                send(seq, time.time())
        except BaseException as exc:  # reported, not raised, from a thread
            errors.append(repr(exc))

    pubs = [
        threading.Thread(target=run, args=(base + sum(shares[:i]), s), daemon=True)
        for i, s in enumerate(shares)
    ]
    for t in pubs:
        t.start()
    t0 = time.time()
    barrier.wait(30)
    return t0, errors


def run_one(system: System, rnd: int, opts: argparse.Namespace) -> dict[str, Any]:
    """Pipeline then idle latency of ``system`` with a fresh worker process."""
    record_dir = os.path.join(system.work, f"{system.name}-{rnd}")
    records = Records(record_dir)
    out: dict[str, Any] = {"system": system.name, "round": rnd}
    proc = system.worker(record_dir)
    try:
        system.send(-1, time.time())  # the worker is up and warm once this one ran
        status, _ = wait_count(records, {}, 1, timeout=60, stall=60, alive=proc.alive)
        if status != "ok":
            out["problem"] = f"worker did not start ({status}): {proc.tail()}"
            return out
        since = records.sizes()
        cpu0 = tree_cpu_s(proc.pid)
        t0, errors = publish(system.send, opts.tasks, opts.publishers, 1_000_000)
        status, _ = wait_count(records, since, opts.tasks, timeout=600, stall=30, alive=proc.alive)
        cpu = tree_cpu_s(proc.pid) - cpu0
        got = records.read(since)
        if status != "ok" or errors:
            out["problem"] = f"pipeline: {status} {errors[:3]}"
            return out
        out["pipeline_per_s"] = opts.tasks / (max(s for _, _, s in got) - t0)
        out["cpu_ms_per_task"] = cpu / opts.tasks * 1000
        out["duplicates"] = len(got) - len({seq for seq, _, _ in got})
        since = records.sizes()
        for seq in range(opts.samples):
            before = records.sizes()
            system.send(2_000_000 + seq, time.time())
            status, _ = wait_count(records, before, 1, timeout=30, stall=30, poll=0.0005)
            if status != "ok":
                out["problem"] = f"latency sample {seq}: {status}"
                return out
            time.sleep(random.uniform(0.001, 0.005))
        values = [(start - sent) * 1000 for _, sent, start in records.read(since)]
        q = percentiles(values)
        out["latency_p50_ms"], out["latency_p99_ms"] = q["p50"], q["p99"]
        out["latency_max_ms"] = q["max"]
        out["latency_over_100ms"] = sum(v > 100 for v in values)
    finally:
        proc.stop()
    return out


# -- the run ------------------------------------------------------------------------------

#: (result key, label) of the table's columns.
COLUMNS = [
    ("pipeline_per_s", "pipeline/s"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("cpu_ms_per_task", "CPU ms/task"),
]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per system, and the per-round ratios of mqtasks-pg to the two others."""
    medians: dict[str, dict[str, float]] = {}
    for name in SYSTEMS:
        mine = [r for r in rows if r["system"] == name and "problem" not in r]
        medians[name] = {key: statistics.median(r[key] for r in mine) for key, _ in COLUMNS if mine}
    ratios: dict[str, dict[str, list[float]]] = {}
    for other in SYSTEMS[1:]:
        ratios[other] = {key: [] for key, _ in COLUMNS}
        for rnd in sorted({r["round"] for r in rows}):
            by = {r["system"]: r for r in rows if r["round"] == rnd and "problem" not in r}
            if "mqtasks-pg" in by and other in by:
                for key, _ in COLUMNS:
                    ratios[other][key].append(by["mqtasks-pg"][key] / by[other][key])
    return {"medians": medians, "ratios": ratios}


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'median':<26}" + "".join(f"{label:>13}" for _, label in COLUMNS))
    for name, m in summary["medians"].items():
        print(f"{name:<26}" + "".join(f"{m.get(k, 0):>13.1f}" for k, _ in COLUMNS))
    for other, rs in summary["ratios"].items():
        cells = []
        for key, _ in COLUMNS:
            v = rs[key]
            cells.append(f"{statistics.median(v):>13.2f}" if v else f"{'-':>13}")
        print(f"{'mqtasks-pg / ' + other:<26}" + "".join(cells))
    print("(ratios: median of the per-round ratios; pipeline above 1 and times below 1 favour")
    print(" mqtasks-pg)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2000, help="tasks per pipeline (2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, systems interleaved (3)")
    p.add_argument("--publishers", type=int, default=4, help="publisher threads (4)")
    p.add_argument("--samples", type=int, default=200, help="latency samples (200)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="a subset, comma-separated")
    p.add_argument("--json", default="", help="write the rows and the summary here")
    opts = p.parse_args(argv)
    from importlib import metadata

    run_id = uuid.uuid4().hex[:8]
    work = tempfile.mkdtemp(prefix="bench-pg-")
    info = machine_info()
    info["procrastinate"] = metadata.version("procrastinate")
    print(
        f"run {run_id}: {opts.tasks} tasks, {opts.rounds} rounds, {opts.publishers} "
        f"publishers | mqtasks {info['mqtasks']} (commit {info['commit']}) | procrastinate "
        f"{info['procrastinate']} | nproc {info['nproc']} | load {info['loadavg']}",
        flush=True,
    )
    systems = [System(name, run_id, work) for name in SYSTEMS if name in opts.systems.split(",")]
    rows: list[dict[str, Any]] = []
    try:
        for s in systems:
            s.setup()
        for rnd in range(opts.rounds):
            k = rnd % len(systems)
            for s in systems[k:] + systems[:k]:
                row = run_one(s, rnd, opts)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for w in list(WorkerProcess.live):
            w.stop()
        for s in systems:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(rows)
    print_table(summary)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"machine": info, "rows": rows, "summary": summary}, fh, indent=2)
        print(f"wrote {opts.json}")
    return 0 if all("problem" not in r and not r.get("duplicates") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
