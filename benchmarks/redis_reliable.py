"""A/B: kombu's Redis transport (``redis+kombu://``) against mqtasks' own (``redis://``).

Starts a private ``redis-server`` on a free loopback port (so ``INFO commandstats``
counts only this run's commands), then, alternating the two transports round by
round: publishes N no-op tasks with ``send_many``, starts an in-process worker
and measures the drain (tasks/s, process CPU per task, Redis commands per task as
Redis counted them, scripts' inner commands included). Also runs the fetch
candidates that were weighed for the reliable transport, on raw redis-py.

    python -m benchmarks.redis_reliable --tasks 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any

import redis

from mqtasks import App, RetryPolicy
from mqtasks.worker import Worker

#: No-op tasks never fail; and kombu's Redis transport cannot hold a retry's delay,
#: so a worker there refuses tasks whose retries would wait.
NO_RETRIES = RetryPolicy(max_retries=0)


def start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="mqt-bench-redis-")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, port, workdir


def command_calls(client: redis.Redis[bytes]) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def drain_once(url: str, n: int, concurrency: int, client: redis.Redis[bytes]) -> dict[str, Any]:
    app = App(
        "bench", broker=url, default_queue=f"bench-{uuid.uuid4().hex[:8]}", retry_policy=NO_RETRIES
    )

    @app.task
    def noop(i: int) -> None:
        return None

    t0 = time.perf_counter()
    noop.map(range(n))
    publish_s = time.perf_counter() - t0
    worker = Worker(app, concurrency=concurrency)
    before = command_calls(client)
    c0, t0 = time.process_time(), time.perf_counter()
    worker.start()
    while worker.settled < n:
        time.sleep(0.005)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = command_calls(client)
    worker.stop()
    app.transport.delete([app.queue(app.settings.default_queue)])
    app.close()
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    delta.pop("info", None)
    return {
        "publish_per_s": n / publish_s,
        "drain_per_s": n / wall,
        "cpu_us_per_task": cpu / n * 1e6,
        "redis_cmds_per_task": sum(delta.values()) / n,
        "commands": {k: round(v / n, 3) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])},
    }


def latency_once(url: str, n: int) -> dict[str, float]:
    """Send-to-start latency at idle: one task at a time, the worker waiting."""
    app = App(
        "bench", broker=url, default_queue=f"bench-{uuid.uuid4().hex[:8]}", retry_policy=NO_RETRIES
    )
    started: list[float] = []

    @app.task
    def stamp() -> None:
        started.append(time.perf_counter())

    worker = Worker(app, concurrency=2)
    worker.start()
    samples = []
    for _ in range(n):
        time.sleep(0.01)  # let the worker go back to sleep in its blocking fetch
        t0 = time.perf_counter()
        stamp.delay()
        while len(started) <= len(samples):
            time.sleep(0.0002)
        samples.append((started[-1] - t0) * 1000)
    worker.stop()
    app.transport.delete([app.queue(app.settings.default_queue)])
    app.close()
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": statistics.median(samples), "p99_ms": q[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed")
    proc, port, workdir = start_redis()
    client: redis.Redis[bytes] = redis.Redis(port=port)
    urls = {
        "redis+kombu://": f"redis+kombu://127.0.0.1:{port}/0",
        "redis://": f"redis://127.0.0.1:{port}/0",
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in urls}
    try:
        for rep in range(args.repeat):
            order = list(urls) if rep % 2 == 0 else list(reversed(urls))
            for name in order:
                r = drain_once(urls[name], args.tasks, args.concurrency, client)
                r.update(latency_once(urls[name], 200))
                runs[name].append(r)
                print(
                    f"round {rep + 1} {name:18s} drain {r['drain_per_s']:7.0f}/s  "
                    f"cpu {r['cpu_us_per_task']:6.0f} us/task  "
                    f"redis {r['redis_cmds_per_task']:.2f} cmds/task  "
                    f"idle latency p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  {r['commands']}"
                )
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    med = {
        k: {
            m: statistics.median(r[m] for r in v)
            for m in (
                "publish_per_s",
                "drain_per_s",
                "cpu_us_per_task",
                "redis_cmds_per_task",
                "p50_ms",
                "p99_ms",
            )
        }
        for k, v in runs.items()
    }
    print(
        f"\nmedians of {args.repeat} rounds, {args.tasks} no-op tasks, concurrency {args.concurrency}"
    )
    print(
        "| transport | publish/s (send_many) | drain tasks/s | worker CPU us/task "
        "| Redis cmds/task | idle latency p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for k, m in med.items():
        print(
            f"| {k} | {m['publish_per_s']:.0f} | {m['drain_per_s']:.0f} | "
            f"{m['cpu_us_per_task']:.0f} | {m['redis_cmds_per_task']:.2f} | "
            f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} |"
        )
    a, b = med["redis://"], med["redis+kombu://"]
    print(
        f"ratios reliable/kombu: drain {a['drain_per_s'] / b['drain_per_s']:.2f}x, "
        f"CPU {a['cpu_us_per_task'] / b['cpu_us_per_task']:.2f}x, "
        f"commands {a['redis_cmds_per_task'] / b['redis_cmds_per_task']:.2f}x, "
        f"publish {a['publish_per_s'] / b['publish_per_s']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "medians": med, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
