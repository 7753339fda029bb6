"""Delays held by Redis (``redis://``): how late do countdown tasks start, and
does holding many of them cost the worker memory?

Against the local Redis (``127.0.0.1:6379``, db 10 by default), under a key
prefix of its own that is deleted at the end. An in-process worker runs no-op
tasks; the process is otherwise idle.

1. Accuracy: ``--short`` tasks published one by one with ``countdown`` drawn
   from ``--min``..``--max`` seconds; the error of each is its start time minus
   (publish time + countdown). Prints p50, p99 and max, and how many started
   early (must be 0).
2. Memory: ``--held`` tasks with countdowns spread over ``--spread`` seconds
   (all still held when sampled), published while the worker runs; prints the
   worker process's RSS before and after, sampled for ``--watch`` seconds.

    python -m benchmarks.redis_delays --short 200 --held 20000
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
import uuid
from typing import Any

import redis

from mqtasks import App
from mqtasks.worker import Worker


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--min", type=float, default=0.1)
    parser.add_argument("--max", type=float, default=3.0)
    parser.add_argument("--held", type=int, default=20000)
    parser.add_argument("--spread", type=float, default=600.0)
    parser.add_argument("--watch", type=float, default=10.0)
    args = parser.parse_args()

    prefix = "{mqt-bench-delays-" + uuid.uuid4().hex[:8] + "}"
    queue = "bench-delays"
    app = App(
        "bench", broker=args.url, default_queue=queue, transport_options={"key_prefix": prefix}
    )
    starts: dict[str, float] = {}
    lock = threading.Lock()

    @app.task
    def tick(tag: str) -> None:
        with lock:
            starts[tag] = time.time()

    @app.task
    def held(n: int) -> None:
        pass

    worker = Worker(app, concurrency=4)
    worker.start()
    try:
        time.sleep(0.5)
        # 1. accuracy
        due: dict[str, float] = {}
        last = 0.0
        for i in range(args.short):
            countdown = random.uniform(args.min, args.max)
            sent = time.time()
            tick.apply_async((f"t{i}",), countdown=countdown)
            due[f"t{i}"] = sent + countdown
            last = max(last, sent + countdown)
            time.sleep(random.uniform(0.0, 0.02))
        deadline = last + 10
        while len(starts) < args.short and time.time() < deadline:
            time.sleep(0.05)
        errors = [starts[t] - due[t] for t in due if t in starts]
        early = sum(e < 0 for e in errors)
        print(
            f"accuracy: {len(errors)}/{args.short} started, countdown {args.min}-{args.max} s; "
            f"error p50 {statistics.median(errors) * 1000:.1f} ms, "
            f"p99 {quantile(errors, 0.99) * 1000:.1f} ms, max {max(errors) * 1000:.1f} ms, "
            f"early {early}"
        )

        # 2. memory with many held
        if args.held:
            idle = rss_mib()
            t0 = time.monotonic()
            for n in range(args.held):  # all due after the sampling window
                held.apply_async((n,), countdown=args.watch + 30 + args.spread * n / args.held)
            print(f"published {args.held} held tasks in {time.monotonic() - t0:.1f} s")
            peak = idle
            end = time.monotonic() + args.watch
            while time.monotonic() < end:
                peak = max(peak, rss_mib())
                time.sleep(0.2)
            counts: dict[str, Any] = app.transport.delayed_counts([app.queue(queue)])
            print(
                f"memory: worker process RSS idle {idle:.1f} MiB, peak while holding "
                f"{peak:.1f} MiB (+{peak - idle:.1f}); Redis holds {counts[queue]} delayed"
            )
    finally:
        worker.stop()
        app.transport.close()
        client = redis.Redis.from_url(args.url)
        pattern = prefix.replace("{", "[{]").replace("}", "[}]") + "*"
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    main()
