"""What observability costs: no-op task throughput with logs, metrics and traces on, and off.

For each broker, in one run, the same workload twice (the order alternates by
round, so drift hits both alike):

* **off**: ``App(..., middleware=[])``: no log context, no metrics, no spans;
* **on**: :class:`~mqtasks.middleware.OpenTelemetryTracing` on the SDK's
  ``TracerProvider`` with a ``BatchSpanProcessor`` and an exporter that drops
  the spans, :class:`~mqtasks.middleware.StructlogContext` with JSON logs at
  info level to a file, and :class:`~mqtasks.middleware.StatsdMetrics` to a
  UDP socket on 127.0.0.1 read by another process.

Each mode publishes N no-op tasks with ``delay()`` (timed: *publish*), then a
worker of 8 threads drains them (timed from ``start()`` until every message
is settled: *drain*). The ratio on/off is the share of throughput kept.

Run ``python -m benchmarks.observability --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mqtasks import App, Worker
from mqtasks.logging import configure_logging
from mqtasks.transport.base import dead_letter_spec

from ._observe import StatsdSink, observed_middleware, tracer_provider
from .throughput import publisher_threads, wait_progress

#: The brokers; nothing else is ever contacted.
BROKERS = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/10",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
#: The timed phases, in the order they run in each mode.
PHASES = ("publish", "drain", "pipeline")
#: What each mode turns on; "off" is the baseline every other mode is compared with.
MODES = {
    "off": (),
    "on": ("traces", "logs", "metrics"),
    "untraced": ("logs", "metrics"),
    "logs": ("logs",),
    "metrics": ("metrics",),
    "traces": ("traces",),
}


@dataclass
class Measurement:
    """One timed phase of one mode on one broker."""

    broker: str
    mode: str
    phase: str
    tasks: int
    seconds: float
    status: str = "ok"
    #: CPU seconds of this process (all threads) during the phase.
    cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """CPU microseconds per task: steadier than the rate on a shared machine."""
        return self.cpu / self.tasks * 1e6 if self.tasks else 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Observability:
    """Everything the "on" mode sends to: a UDP sink, a log file, a tracer provider."""

    def __init__(self, log_path: str, log_level: str = "info", sample: float = 1.0) -> None:
        self.sink = StatsdSink()
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        configure_logging(log_level, "json", stream=self.log)
        self.provider, self.exporter = tracer_provider(sample)

    def middleware(self, mode: str) -> list[Any]:
        parts = MODES[mode]
        return observed_middleware(
            self.provider if "traces" in parts else None,
            self.sink.url() if "metrics" in parts else None,
            logs="logs" in parts,
        )

    def close(self) -> tuple[int, int, int]:
        """Flush and stop; return (datagrams received, spans exported, log lines)."""
        self.provider.shutdown()
        time.sleep(0.2)  # let the last datagrams arrive
        packets = self.sink.close()
        self.log.close()
        with open(self.log.name) as fh:
            lines = sum(1 for _ in fh)
        return packets, self.exporter.spans, lines


def run_mode(
    broker: str, mode: str, queue: str, obs: Observability, opts: argparse.Namespace
) -> list[Measurement]:
    url = BROKERS[broker]
    middleware = obs.middleware(mode)
    app = App("bench", broker=url, default_queue=queue, middleware=middleware)

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    n = opts.tasks
    out: list[Measurement] = []
    try:
        app.declare()
        noop.apply_async(queue=queue + "-warm")  # connect the publishing pool untimed
        # publish: N delay() calls in one thread
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(n):
            noop.delay()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        out.append(Measurement(broker, mode, "publish", n, seconds, cpu=cpu))
        # drain: a worker empties the queue
        worker = Worker(app, concurrency=opts.concurrency, shutdown_timeout=10.0)
        worker.start(timeout=30.0)
        try:
            c0, t0 = cpu_seconds(), time.perf_counter()
            status, t1 = wait_progress(
                lambda: worker.settled, n, time.monotonic() + opts.timeout, opts.stall
            )
            cpu = cpu_seconds() - c0
            out.append(Measurement(broker, mode, "drain", worker.settled, t1 - t0, status, cpu))
        finally:
            worker.stop()
        if "pipeline" in opts.phase_list:
            out.append(_pipeline(app, noop, broker, mode, opts))
    finally:
        try:
            spec = app.queue(queue)
            warm = app.queue(queue + "-warm")
            app.transport.delete([spec, warm, dead_letter_spec(spec), dead_letter_spec(warm)])
        except Exception as exc:
            print(f"  warning: could not delete {queue}: {exc!r}", file=sys.stderr)
        app.close()
    return out


def _pipeline(app: App, noop: Any, broker: str, mode: str, opts: argparse.Namespace) -> Measurement:
    """Publishers and a worker at once: the throughput benchmark's end-to-end phase."""
    n = opts.tasks
    errors: list[BaseException] = []
    stop = threading.Event()
    threads = publisher_threads(noop.delay, n, opts.publishers, stop, errors)
    worker = Worker(app, concurrency=opts.concurrency, shutdown_timeout=10.0)
    worker.start(timeout=30.0)
    try:
        c0, t0 = cpu_seconds(), time.perf_counter()
        for t in threads:
            t.start()
        status, t1 = wait_progress(
            lambda: worker.settled, n, time.monotonic() + opts.timeout, opts.stall
        )
        cpu = cpu_seconds() - c0
        done = worker.settled
    finally:
        stop.set()
        for t in threads:
            t.join(15.0)
        worker.stop()
    if errors:
        status = f"publisher error: {errors[0]!r}"
    return Measurement(broker, mode, "pipeline", done, t1 - t0, status, cpu)


def summarise(
    results: list[Measurement], brokers: list[str], modes: list[str]
) -> list[dict[str, Any]]:
    """Medians per broker, phase and mode, each compared with "off"."""
    rows = []
    for broker in brokers:
        for phase in PHASES:
            base: dict[str, float] = {}
            for mode in ["off", *[m for m in modes if m != "off"]]:
                runs = [m for m in results if (m.broker, m.phase, m.mode) == (broker, phase, mode)]
                if not runs:
                    continue
                rate = statistics.median(m.rate for m in runs)
                cpu_us = statistics.median(m.cpu_us for m in runs)
                if mode == "off":
                    base = {"rate": rate, "cpu_us": cpu_us}
                rows.append(
                    {
                        "broker": broker,
                        "phase": phase,
                        "mode": mode,
                        "per_s": rate,
                        "ratio": rate / base["rate"] if base.get("rate") else 0.0,
                        "cpu_us": cpu_us,
                        "extra_cpu_us": cpu_us - base.get("cpu_us", cpu_us),
                        "problems": [m.status for m in runs if m.status != "ok"],
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]], target: float) -> None:
    print(
        f"\n{'broker':<8}{'phase':<9}{'mode':<9}{'tasks/s':>9}{'vs off':>8}"
        f"{'CPU µs/task':>13}{'extra':>8}"
    )
    print("-" * 64)
    for row in rows:
        mark = "*" if row["problems"] else ""
        over = row["mode"] == "on" and row["phase"] != "publish" and 1 - row["ratio"] > target
        print(
            f"{row['broker']:<8}{row['phase']:<9}{row['mode']:<9}{row['per_s']:>9,.0f}"
            f"{row['ratio']:>8.2f}{row['cpu_us']:>13,.0f}{row['extra_cpu_us']:>+8,.0f}"
            f"{'  over target' if over else ''}{mark}"
        )
    for row in rows:
        for problem in row["problems"]:
            print(f"* {row['broker']} {row['phase']} {row['mode']}: {problem}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.observability",
        description="No-op task throughput with logs, metrics and traces on and off.",
    )
    p.add_argument("--tasks", type=int, default=5000, help="tasks per measurement (5000)")
    p.add_argument("--brokers", default="memory,redis,amqp", help="comma-separated (all three)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (3)")
    p.add_argument(
        "--modes",
        default="off,on",
        help=f"comma-separated, of {','.join(MODES)} (off,on); off is always run",
    )
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (8)")
    p.add_argument(
        "--publishers", type=int, default=2, help="publisher threads in the pipeline phase (2)"
    )
    p.add_argument(
        "--phases",
        default="publish,drain,pipeline",
        help="publish and drain always run; pipeline only if named (all three)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase (300)")
    p.add_argument("--stall", type=float, default=20.0, help="seconds without progress = stall")
    p.add_argument("--log-level", default="info", help="level of the JSON log (info)")
    p.add_argument(
        "--sample", type=float, default=1.0, help="share of traces recorded (1.0: every one)"
    )
    p.add_argument(
        "--target", type=float, default=0.25, help="largest acceptable cost (0.25 = 25 %%)"
    )
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    unknown = [b for b in opts.broker_list if b not in BROKERS]
    if unknown:
        p.error(f"unknown broker(s) {unknown}; choose from {sorted(BROKERS)}")
    opts.mode_list = ["off"] + [
        m.strip() for m in opts.modes.split(",") if m.strip() not in ("", "off")
    ]
    bad = [m for m in opts.mode_list if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    opts.phase_list = [ph.strip() for ph in opts.phases.split(",") if ph.strip()]
    if any(ph not in PHASES for ph in opts.phase_list):
        p.error(f"unknown phase(s) in {opts.phases!r}; choose from {list(PHASES)}")
    if opts.tasks < 1 or opts.repeat < 1 or opts.publishers < 1:
        p.error("--tasks and --repeat must be at least 1")
    for url in BROKERS.values():
        host = urlsplit(url).hostname
        if host not in (None, "127.0.0.1", "localhost", "::1"):
            p.error(f"refusing non-loopback broker {host}")
    return opts


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    run_id = uuid.uuid4().hex[:8]
    log_dir = tempfile.mkdtemp(prefix=f"bench-obs-{run_id}-")
    obs = Observability(os.path.join(log_dir, "worker.jsonl"), opts.log_level, opts.sample)
    print(
        f"run {run_id}: {opts.tasks} tasks, concurrency {opts.concurrency}, "
        f"{opts.repeat} round(s), log level {opts.log_level}, traces sampled {opts.sample:.0%}; "
        f"JSON logs in {obs.log.name}",
        flush=True,
    )
    results: list[Measurement] = []
    status = 0
    try:
        for broker in opts.broker_list:
            for round_ in range(opts.repeat):
                modes = opts.mode_list if round_ % 2 == 0 else opts.mode_list[::-1]
                for mode in modes:
                    queue = f"bench-obs-{run_id}-{broker}-{mode}-{round_}"
                    measured = run_mode(broker, mode, queue, obs, opts)
                    results += measured
                    print(
                        f"  {broker} round {round_ + 1} {mode:>3}: "
                        + ", ".join(
                            f"{m.phase} {m.rate:,.0f}/s ({m.cpu_us:,.0f} µs CPU)" for m in measured
                        ),
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("interrupted; queues deleted", file=sys.stderr)
        status = 130
    except Exception as exc:
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        status = 1
    packets, spans, lines = obs.close()
    rows = summarise(results, opts.broker_list, opts.mode_list)
    print_table(rows, opts.target)
    print(
        f"\nin all, {packets:,} StatsD datagrams, exported {spans:,} spans and wrote "
        f"{lines:,} JSON log lines"
    )
    # The verdict: the end-to-end pipeline, the throughput benchmark's headline
    # figure, when it ran; the drain otherwise.
    judged = "pipeline" if "pipeline" in opts.phase_list else "drain"
    drains = [r for r in rows if r["phase"] == judged and r["mode"] == "on"]
    if status == 0 and any(1 - r["ratio"] > opts.target for r in drains):
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
