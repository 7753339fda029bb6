"""mqtasks against Celery on SQS: both through kombu's SQS transport, on one local moto server.

Usage::

    python -m benchmarks.sqs --tasks 300 --repeat 1

Starts ``moto_server`` (moto's SQS in server mode) as a subprocess on a free
127.0.0.1 port with fake credentials: no AWS account is ever reached. For each
system in turn (alternating, round by round), on a queue of its own:

* **publish**: N ``noop.delay(seq, sent)`` calls in one thread of this process
  (mqtasks returns once ``SendMessage`` answered; Celery's ``delay`` sends the
  same way); the CPU of this process per publish;
* **drain**: the worker is started on the loaded queue; from its first task to
  its last, tasks per second and the CPU seconds per task of the worker's
  process tree, and of the moto server (what each system's API calls cost it).

Workers: ``mqtasks worker -c 8`` (prefetch 16, acks late, visibility renewed
while held); ``celery worker -P solo`` (prefetch multiplier 16) and ``-P prefork
-c 2`` (multiplier 8): ``task_acks_late``, no results, no events
(``benchmarks/bench_celery_app.py``). Celery's SQS consumer runs on its event
loop and needs pycurl; mqtasks' does not. Both keep kombu's SQS defaults
otherwise, except that mqtasks long-polls 1 s instead of 10 (an idle queue's
wait, which a full-queue drain does not meet).

moto answers every request in Python on the same 2 cores: absolute rates are
moto's, not SQS's. Compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ._workers import Records, WorkerProcess, tree_cpu_s, wait_count

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Fake credentials for moto; set before boto3 is imported anywhere in this process.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SYSTEMS = ("mqtasks", "celery-solo", "celery-prefork2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(log_dir: str) -> Iterator[tuple[str, int]]:
    """Run ``moto_server`` on a free loopback port; yield (``sqs://`` URL, its pid)."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    log = open(os.path.join(log_dir, "moto.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start; see moto.log")
            time.sleep(0.2)
        yield f"sqs://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


def publisher(system: str, url: str, queue: str) -> tuple[Callable[[int, float], None], Any]:
    """Return ``send(seq, sent)`` of ``system`` on ``queue``, and the app (to close)."""
    if system == "mqtasks":
        from .bench_mqtasks_app import make_app

        with warnings.catch_warnings():  # the module's own app registered the task name too
            warnings.simplefilter("ignore")
            app, noop = make_app(url, queue)
        app.transport.declare([app.queue(queue)])
        return (lambda seq, sent: noop.delay(seq, sent)), app
    from .bench_celery_app import make_app as make_celery

    with warnings.catch_warnings():  # the module's own app registered the task name too
        warnings.simplefilter("ignore")
        capp = make_celery(url, queue)
    task = capp.tasks["bench.noop"]
    return (lambda seq, sent: task.delay(seq, sent)), capp


def worker_argv(system: str, queue: str) -> tuple[list[str], dict[str, str]]:
    if system == "mqtasks":
        argv = [sys.executable, "-m", "mqtasks", "worker", "-A", "benchmarks.bench_mqtasks_app"]
        return [*argv, "-c", "8", "--log-level", "warning"], {}
    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
    argv = [
        celery, "-A", "benchmarks.bench_celery_app", "worker", "-O", "fair", "-Q", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{queue}@%h", "--loglevel", "WARNING",
    ]  # fmt: skip
    if system == "celery-solo":
        return [*argv, "-P", "solo"], {"BENCH_PREFETCH_MULTIPLIER": "16"}
    return [*argv, "-P", "prefork", "-c", "2"], {"BENCH_PREFETCH_MULTIPLIER": "8"}


def measure(
    system: str, url: str, moto_pid: int, tasks: int, work: str, stall: float
) -> dict[str, Any]:
    """Publish ``tasks`` no-op tasks with ``system``, then drain them with its worker."""
    queue = f"bench-{uuid.uuid4().hex[:8]}-{system}"
    record_dir = os.path.join(work, queue)
    records = Records(record_dir)
    send, app = publisher(system, url, queue)
    row: dict[str, Any] = {"system": system, "tasks": tasks}
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for seq in range(tasks):
            send(seq, time.time())
        elapsed = time.perf_counter() - t0
        row["publish_per_s"] = tasks / elapsed
        row["publish_cpu_ms"] = (time.process_time() - cpu0) / tasks * 1000
        argv, extra = worker_argv(system, queue)
        env = {
            **os.environ,
            **AWS_ENV,
            **extra,
            "BENCH_BROKER_URL": url,
            "BENCH_QUEUE": queue,
            "BENCH_RECORD_DIR": record_dir,
        }
        worker = WorkerProcess(argv, env, os.path.join(work, f"{queue}.log"))
        try:
            status, _ = wait_count(records, {}, 1, timeout=120, stall=120, alive=worker.alive)
            if status != "ok":
                row["problem"] = f"no task started ({status}): {worker.tail()}"
                return row
            first = records.count()
            c0, m0, s0 = tree_cpu_s(worker.pid), tree_cpu_s(moto_pid), time.perf_counter()
            status, done = wait_count(
                records, {}, tasks, timeout=600, stall=stall, alive=worker.alive
            )
            c1, m1, s1 = tree_cpu_s(worker.pid), tree_cpu_s(moto_pid), time.perf_counter()
            n = done - first
            row["drain_per_s"] = n / (s1 - s0) if s1 > s0 else None
            row["worker_cpu_ms"] = (c1 - c0) / n * 1000 if n else None
            row["moto_cpu_ms"] = (m1 - m0) / n * 1000 if n else None
            if status != "ok":
                row["problem"] = status
        finally:
            worker.stop()
    finally:
        with contextlib.suppress(Exception):
            if system == "mqtasks":
                app.transport.delete([app.queue(queue)])
                app.close()
            else:
                with app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(queue)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("publish_per_s", "publish_cpu_ms", "drain_per_s", "worker_cpu_ms", "moto_cpu_ms")
    out: dict[str, dict[str, float]] = {}
    for system in SYSTEMS:
        mine = [r for r in rows if r["system"] == system]
        if mine:
            out[system] = {
                k: statistics.median([r[k] for r in mine if r.get(k) is not None] or [0.0])
                for k in keys
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    os.environ.update(AWS_ENV)
    systems = [s for s in args.systems.split(",") if s]
    rows: list[dict[str, Any]] = []
    work = tempfile.mkdtemp(prefix="bench-sqs-")
    try:
        with moto_server(work) as (url, moto_pid):
            for r in range(args.repeat):
                for system in systems:
                    row = measure(system, url, moto_pid, args.tasks, work, args.stall)
                    row["round"] = r
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for w in list(WorkerProcess.live):
            w.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(rows)
    base = summary.get("mqtasks", {})
    print(f"\n{'system':<16}{'publish/s':>11}{'pub CPU ms':>11}{'drain/s':>9}"
          f"{'worker CPU ms/task':>20}{'moto CPU ms/task':>18}{'drain vs mqtasks':>18}")  # fmt: skip
    for system, s in summary.items():
        ratio = s["drain_per_s"] / base["drain_per_s"] if base.get("drain_per_s") else 0.0
        print(
            f"{system:<16}{s['publish_per_s']:>11.0f}{s['publish_cpu_ms']:>11.2f}"
            f"{s['drain_per_s']:>9.0f}{s['worker_cpu_ms']:>20.2f}{s['moto_cpu_ms']:>18.2f}"
            f"{ratio:>18.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary}, fh, indent=2)
    return 0 if all("problem" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
