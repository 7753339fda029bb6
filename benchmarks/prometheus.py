"""What Prometheus metrics cost: no-op task throughput with and without PrometheusMetrics.

On the memory broker (no network, so the middleware's share is as large as it
gets), each mode runs in a fresh interpreter, alternating by round so that
drift hits all alike:

* **off**: ``App(..., middleware=[])``;
* **hooks**: a middleware that overrides the same hooks and does nothing: what
  the worker's calling of any such middleware costs;
* **on**: ``middleware=[PrometheusMetrics()]``, values in the process;
* **multiprocess**: the same with ``PROMETHEUS_MULTIPROC_DIR`` set, values in
  memory-mapped files, as each child of ``mqtasks worker --processes`` has them.

Each mode publishes N no-op tasks with ``delay()`` (timed: *publish*), then a
worker of 8 threads runs them (timed from ``start()`` until the last task has
run: *drain*). The ratio mode/off is the share of throughput kept; on a busy
machine the CPU time per task is steadier. Last, *direct*: the CPU time of
the middleware's ``before_process`` and ``after_process`` for one successful
task, called N times in one thread.

Run ``python -m benchmarks.prometheus [--tasks N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

MODES = ("off", "hooks", "on", "multiprocess")


def run_one(mode: str, tasks: int, concurrency: int) -> dict[str, float]:
    """Measure ``mode`` in this process; return seconds of each phase."""
    from mqtasks import App, Worker
    from mqtasks.middleware.prometheus import PrometheusMetrics

    middleware: list[Any] = []
    if mode == "hooks":
        middleware = [_hollow(PrometheusMetrics)()]
    elif mode != "off":
        middleware = [PrometheusMetrics()]
    app = App("bench", broker="memory://", middleware=middleware)
    done, finished = itertools.count(1), threading.Event()

    @app.task(name="bench.noop")
    def noop() -> None:
        if next(done) == tasks:  # next() on a count is atomic under the GIL
            finished.set()

    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(tasks):
        noop.delay()
    publish, publish_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    worker = Worker(app, concurrency=concurrency)
    c0, t0 = cpu_seconds(), time.perf_counter()
    worker.start()
    if not finished.wait(300):
        raise SystemExit(f"{mode}: the tasks did not finish in 300 s")
    drain, drain_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    worker.stop()
    return {
        "publish": publish,
        "drain": drain,
        "publish_cpu_us": publish_cpu / tasks * 1e6,
        "drain_cpu_us": drain_cpu / tasks * 1e6,
        "hooks_us": hook_cost(worker, middleware, tasks),
    }


def hook_cost(worker: Any, middleware: list[Any], tasks: int) -> float:
    """CPU microseconds the middleware's hooks take for one successful task, called
    in one thread with no worker around: steadier than a whole run on a busy machine."""
    from mqtasks.message import Message

    if not middleware:
        return 0.0
    mw = middleware[0]
    published_at = datetime.now(timezone.utc)
    message = Message(
        id="m", task="bench.noop", args=(), kwargs={}, queue="q", published_at=published_at
    )
    c0 = cpu_seconds()
    for _ in range(tasks):
        mw.before_process(worker, message)
        mw.after_process(worker, message, result=None)
    return (cpu_seconds() - c0) / tasks * 1e6


def _hollow(cls: type[Any]) -> type[Any]:
    """A middleware class whose hooks are those ``cls`` overrides, doing nothing."""
    from mqtasks.middleware import Middleware

    def nothing(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    hooks = [name for name in vars(cls) if name.startswith(("before_", "after_", "worker_"))]
    return type("Hollow", (Middleware,), dict.fromkeys(hooks, nothing))


def cpu_seconds() -> float:
    """CPU seconds of this process, all threads: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, opts: argparse.Namespace) -> dict[str, float]:
    """Run ``mode`` in a fresh interpreter (multiprocess mode must be chosen before import)."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    directory = None
    if mode == "multiprocess":
        directory = env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-prom-")
    argv = [sys.executable, "-m", "benchmarks.prometheus", "--one", mode]
    argv += ["--tasks", str(opts.tasks), "--concurrency", str(opts.concurrency)]
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=900)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20000, help="tasks per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are shown")
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.one:
        os.environ.setdefault("MQTASKS_LOG_FORMAT", "json")
        print(json.dumps(run_one(opts.one, opts.tasks, opts.concurrency)))
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for r in range(opts.repeat):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            runs[mode].append(measure(mode, opts))
    print(f"memory broker, {opts.tasks} no-op tasks, {opts.concurrency} worker threads,")
    print(f"median of {opts.repeat} rounds; ratio: throughput kept; +µs: CPU per task added")
    header = f"{'mode':<14}" + f"{'tasks/s':>10}{'ratio':>7}{'CPU µs':>9}{'+µs':>7}" * 2
    header += f"{'hooks µs':>10}"
    print(f"{'':<14}{'publish':^33}{'drain':^33}{'direct':>10}")
    print(header)

    def median(mode: str, key: str) -> float:
        return statistics.median(m[key] for m in runs[mode])

    for mode in MODES:
        row = f"{mode:<14}"
        for phase in ("publish", "drain"):
            seconds, cpu = median(mode, phase), median(mode, f"{phase}_cpu_us")
            ratio = median("off", phase) / seconds
            added = cpu - median("off", f"{phase}_cpu_us")
            row += f"{opts.tasks / seconds:>10,.0f}{ratio:>7.2f}{cpu:>9.1f}{added:>+7.1f}"
        print(row + f"{median(mode, 'hooks_us'):>10.2f}")


if __name__ == "__main__":
    main()
