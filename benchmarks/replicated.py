"""Redis ``durability="replicated"`` against plain publishing, in one run:
``python -m benchmarks.replicated``.

Starts its own Redis primary, replica and three Sentinels on free loopback ports
(:class:`reliability.redis_sentinel.SentinelGroup`; the shared Redis is not
used) and publishes no-op tasks with ``delay()`` through the
``redis+sentinel://`` URL, alternating the two modes round by round so that
drift on a shared machine hits both alike:

* ``local``: ``delay()`` returns on the primary's reply;
* ``replicated``: ``delay()`` returns once ``WAIT 1`` reports a replica has it.

For each mode: ``delay()`` calls per second from one thread and from
``--threads`` threads, and the one-thread ``delay()`` latency p50/p99 (ms).
Nothing consumes the tasks; the queue is deleted at the end.

    python -m benchmarks.replicated --tasks 2000 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqtasks import App
from reliability.redis_sentinel import SentinelGroup

MODES = ("local", "replicated")


def _app(url: str, durability: str, queue: str) -> App:
    app = App("bench-replicated", broker=url, durability=durability, default_queue=queue)
    transport = app.transport
    # The App hands the setting to its transport; set it here too, so that the
    # benchmark measures the mode asked for whatever the App passes.
    if getattr(transport, "durability", "local") != durability:
        transport.durability = durability  # type: ignore[attr-defined]

    @app.task(name="bench.noop")
    def noop() -> None:
        """Never run: nothing consumes."""

    return app


def _one_thread(app: App, n: int) -> tuple[float, list[float]]:
    task = app.tasks["bench.noop"]
    latencies = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        task.delay()
        latencies.append(time.perf_counter() - t)
    return n / (time.perf_counter() - t0), latencies


def _threads(app: App, n: int, threads: int) -> float:
    task = app.tasks["bench.noop"]
    each = n // threads

    def publish() -> None:
        for _ in range(each):
            task.delay()

    workers = [threading.Thread(target=publish) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return each * threads / (time.perf_counter() - t0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="delay() calls per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    parser.add_argument("--threads", type=int, default=4, help="publisher threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    group = SentinelGroup(Path(tempfile.mkdtemp(prefix="mqtasks-bench-sentinel-")))
    rows: dict[str, dict[str, list[float]]] = {
        m: {"one": [], "threads": [], "lat": []} for m in MODES
    }
    try:
        group.start()
        queue = f"bench-replicated-{int(time.time())}"
        apps = {m: _app(group.url, m, queue) for m in MODES}
        for app in apps.values():
            app.tasks["bench.noop"].delay()  # connect and declare before timing
        for _ in range(args.rounds):
            for mode in MODES:
                rate, lat = _one_thread(apps[mode], args.tasks)
                rows[mode]["one"].append(rate)
                rows[mode]["lat"].extend(lat)
                rows[mode]["threads"].append(_threads(apps[mode], args.tasks, args.threads))
        apps["local"].transport.purge([apps["local"].queue(queue)])
        for app in apps.values():
            app.close()
    finally:
        group.stop()

    summary: dict[str, Any] = {}
    for mode in MODES:
        r = rows[mode]
        summary[mode] = {
            "delay_per_s_1_thread": round(statistics.median(r["one"]), 1),
            f"delay_per_s_{args.threads}_threads": round(statistics.median(r["threads"]), 1),
            "delay_ms_p50": round(_pct(r["lat"], 0.50), 3),
            "delay_ms_p99": round(_pct(r["lat"], 0.99), 3),
        }
    local, repl = summary["local"], summary["replicated"]
    summary["ratio_replicated_to_local"] = {
        k: round(repl[k] / local[k], 2) if local[k] else None for k in local
    }
    print(f"{'':34}{'local':>12}{'replicated':>12}{'ratio':>8}")
    for key in local:
        ratio = summary["ratio_replicated_to_local"][key]
        print(f"{key:34}{local[key]:>12}{repl[key]:>12}{ratio:>8}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"options": vars(args) | {"json": str(args.json)}, **summary}, indent=2)
        )


if __name__ == "__main__":
    main()
