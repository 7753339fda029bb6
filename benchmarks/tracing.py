"""The tracing budget: throughput kept with observability on, and what mqtasks adds to a span.

In one run, three figures, each checked against its target:

1. **logs + metrics**: the no-op pipeline of ``observability.py`` with
   :class:`~mqtasks.middleware.StructlogContext` and
   :class:`~mqtasks.middleware.StatsdMetrics` on, against everything off
   (target: at least 0.8 of the throughput);
2. **everything on, 1 trace in 10**: logs, metrics and
   :class:`~mqtasks.middleware.OpenTelemetryTracing` on the SDK's tracer provider
   with ``ParentBased(TraceIdRatioBased(0.1))`` (``parentbased_traceidratio``),
   against everything off (target: at least 0.75);
3. **mqtasks' own cost per span**, every span recorded (``ALWAYS_ON``, a
   ``SimpleSpanProcessor`` whose exporter drops the spans): the middleware's
   publish hooks (``before_publish`` + ``after_publish``) and process hooks
   (``before_process`` + ``after_process``) per task, minus a loop that only
   starts and ends an empty span on the same provider (target: at most 10 µs
   on each side). The SDK work the hooks ask for besides the empty span
   (propagating the context, the span's attributes, making it current) is
   timed on its own too, so the remainder is mqtasks' code alone.

Throughput modes, and the hook loops, run interleaved (A/B/A/B...) so drift on
a shared machine hits each alike; medians and spreads (lowest-highest) are
printed.

Run ``python -m benchmarks.tracing --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from mqtasks import App, Message, Worker
from mqtasks.middleware import OpenTelemetryTracing

from ._observe import DroppingExporter
from .observability import BROKERS, Measurement, Observability, run_mode

#: The throughput modes: everything off, logs and metrics, everything on.
MODES = ("off", "untraced", "on")
#: Least share of throughput kept, per mode.
TARGETS = {"untraced": 0.8, "on": 0.75}
#: Most microseconds per task mqtasks' tracing code may add to an empty span, per side.
HOOK_TARGET_US = 10.0
#: The sampler's ratio in the throughput modes (``parentbased_traceidratio``, 1 in 10).
SAMPLE = 0.1


# -- 3. the hooks against an empty span ----------------------------------------------


class HookLoops:
    """The timed loops of figure 3, each over the same provider, app and messages.

    Besides the hooks and the empty span, each side has a loop making the same
    OpenTelemetry calls as its hooks, and nothing else: the SDK work the hooks
    ask for. Hooks less that loop is mqtasks' code alone.
    """

    def __init__(self, tasks: int, sampler: Sampler = ALWAYS_ON) -> None:
        self.tasks = tasks
        self.exporter = DroppingExporter()
        self.provider = TracerProvider(sampler=sampler)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = OpenTelemetryTracing(self.provider)
        self.tracer = self.provider.get_tracer("bench")
        self.app = App("bench", broker="memory://", middleware=[self.tracing])
        self.worker = Worker(self.app, queues=["bench"], concurrency=1)
        # Distinct ids and so trace ids, as the ratio sampler decides on the trace id.
        self.messages = [
            Message(id=uuid.uuid4().hex, task="bench.noop", queue="bench") for _ in range(tasks)
        ]
        # What a worker receives: each message as a traced publish left it.
        self.received = []
        for message in self.messages:
            sent = self.tracing.before_publish(self.app, message)
            self.tracing.after_publish(self.app, sent)
            self.received.append(sent)

    def loops(self) -> dict[str, Callable[[int], None]]:
        """Name -> one iteration over message ``i``."""
        tracing, app, worker, tracer = self.tracing, self.app, self.worker, self.tracer
        messages, received = self.messages, self.received
        publish_kind, process_kind = SpanKind.PRODUCER, SpanKind.CONSUMER
        set_span_in_context = trace.set_span_in_context
        attach, detach = otel_context.attach, otel_context.detach
        inject, extract = propagate.inject, propagate.extract

        def attributes(message: Message, operation: str) -> dict[str, Any]:
            return {
                "messaging.system": "memory",
                "messaging.destination.name": "bench",
                "messaging.operation": operation,
                "mqtasks.task.name": "bench.noop",
                "messaging.message.id": message.id,
                "mqtasks.task.attempt": 1,
            }

        publish_attributes = [attributes(m, "publish") for m in messages]
        process_attributes = [attributes(m, "process") for m in messages]

        def publish_hooks(i: int) -> None:
            sent = tracing.before_publish(app, messages[i])
            tracing.after_publish(app, sent)

        def publish_sdk(i: int) -> None:
            span = tracer.start_span("bench publish", kind=publish_kind)
            if span.is_recording():
                span.set_attributes(publish_attributes[i])
            inject({}, context=set_span_in_context(span))
            span.end()

        def process_hooks(i: int) -> None:
            tracing.before_process(worker, received[i])
            tracing.after_process(worker, received[i], result=None)

        def process_sdk(i: int) -> None:
            parent = extract(received[i].headers)
            span = tracer.start_span("bench process", context=parent, kind=process_kind)
            if span.is_recording():
                span.set_attributes(process_attributes[i])
            detach(attach(set_span_in_context(span, parent)))
            span.end()

        def empty_span(i: int) -> None:
            tracer.start_span("bench publish", kind=publish_kind).end()

        return {
            "publish hooks": publish_hooks,
            "publish: the same SDK calls alone": publish_sdk,
            "process hooks": process_hooks,
            "process: the same SDK calls alone": process_sdk,
            "empty span": empty_span,
        }

    def time(self, step: Callable[[int], None]) -> float:
        """CPU microseconds of this thread per iteration of ``step``."""
        n = self.tasks
        t0 = time.thread_time_ns()
        for i in range(n):
            step(i)
        return (time.thread_time_ns() - t0) / n / 1000

    def close(self) -> None:
        self.app.close()
        self.provider.shutdown()


def run_hooks(tasks: int, rounds: int, sampler: Sampler = ALWAYS_ON) -> dict[str, list[float]]:
    """Time every loop ``rounds`` times, interleaved, the order reversed every other round."""
    bench = HookLoops(tasks, sampler)
    loops = bench.loops()
    for step in loops.values():  # warm up: imports, caches, the first spans
        for i in range(min(tasks, 500)):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in loops}
    try:
        for round_ in range(rounds):
            names = list(loops) if round_ % 2 == 0 else list(loops)[::-1]
            for name in names:
                times[name].append(bench.time(loops[name]))
    finally:
        bench.close()
    return times


def hook_figures(times: dict[str, list[float]]) -> dict[str, dict[str, list[float]]]:
    """Per side and round: hooks less the empty span, split into SDK calls and mqtasks' code."""
    figures = {}
    empty = times["empty span"]
    for side in ("publish", "process"):
        hooks, sdk = times[f"{side} hooks"], times[f"{side}: the same SDK calls alone"]
        figures[side] = {
            "hooks - empty span": [h - e for h, e in zip(hooks, empty, strict=True)],
            "of which SDK calls": [s - e for s, e in zip(sdk, empty, strict=True)],
            "of which mqtasks' code": [h - s for h, s in zip(hooks, sdk, strict=True)],
        }
    return figures


def lowest_figures(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """The same figures from each loop's lowest time: the least disturbed by other load."""
    low = {name: min(values) for name, values in times.items()}
    return {
        side: {
            "hooks - empty span": low[f"{side} hooks"] - low["empty span"],
            "of which SDK calls": low[f"{side}: the same SDK calls alone"] - low["empty span"],
            "of which mqtasks' code": (
                low[f"{side} hooks"] - low[f"{side}: the same SDK calls alone"]
            ),
        }
        for side in ("publish", "process")
    }


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """Median (lowest-highest)."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} ({fmt.format(low)} to {fmt.format(high)})"


def print_hooks(times: dict[str, list[float]], title: str) -> dict[str, dict[str, float]]:
    """Print the loops and figures; return the medians of the figures."""
    rounds = len(times["empty span"])
    print(f"\n{title}: CPU µs per task, median (lowest to highest) of {rounds} rounds")
    for name, values in times.items():
        print(f"  {name:<40}{spread(values):>24}")
    print(f"  {'':<40}{'per round, median (range)':>24}{'from lowest':>13}")
    medians: dict[str, dict[str, float]] = {}
    lowest = lowest_figures(times)
    for side, figures in hook_figures(times).items():
        medians[side] = {}
        for name, values in figures.items():
            medians[side][name] = median = statistics.median(values)
            mark = ""
            if name != "of which SDK calls":
                mark = "  ≤ 10: met" if median <= HOOK_TARGET_US else "  > 10: missed"
            line = f"{side}: {name}"
            print(f"  {line:<40}{spread(values):>24}{lowest[side][name]:>13.1f}{mark}")
    return medians


# -- 1, 2. throughput --------------------------------------------------------------


def run_throughput(opts: argparse.Namespace, run_id: str) -> list[Measurement]:
    log_dir = tempfile.mkdtemp(prefix=f"bench-tracing-{run_id}-")
    obs = Observability(os.path.join(log_dir, "worker.jsonl"), "info", SAMPLE)
    # A/B/C, C/B/A, ...: the order of the modes alternates by round.
    schedule = [
        (broker, round_, mode)
        for broker in opts.broker_list
        for round_ in range(opts.repeat)
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1])
    ]
    results: list[Measurement] = []
    try:
        for broker, round_, mode in schedule:
            queue = f"bench-tracing-{run_id}-{broker}-{mode}-{round_}"
            measured = run_mode(broker, mode, queue, obs, opts)
            results += measured
            rates = ", ".join(f"{m.phase} {m.rate:,.0f}/s" for m in measured)
            print(f"  {broker} round {round_ + 1} {mode:>8}: {rates}", flush=True)
    finally:
        obs.close()
    return results


def _runs(results: list[Measurement], broker: str, phase: str, mode: str) -> list[Measurement]:
    """The measurements of one broker, phase and mode, in round order."""
    return [m for m in results if (m.broker, m.phase, m.mode) == (broker, phase, mode)]


def print_throughput(results: list[Measurement], opts: argparse.Namespace) -> bool:
    """Ratios per round (a mode against "off" of the same round), medians; True if all met.

    Two ratios: of the rates (tasks per second), and of the CPU time per task
    (off / mode: the throughput kept where the CPU is the limit), which moves
    less when other processes take the cores.
    """
    ok = True
    print(
        "\nthroughput kept against everything off, per round: median (lowest to highest)"
        "\n  of the rates, and of CPU µs per task (off / mode)"
    )
    for broker in opts.broker_list:
        for phase in opts.phase_list:
            off = _runs(results, broker, phase, "off")
            if not off:
                continue
            rate, cpu = (
                statistics.median(m.rate for m in off),
                statistics.median(m.cpu_us for m in off),
            )
            print(f"  {broker:<7}{phase:<9} off {rate:>6,.0f}/s {cpu:>4,.0f} µs")
            for mode in TARGETS:
                pairs = list(zip(_runs(results, broker, phase, mode), off, strict=False))
                by_rate = [m.rate / o.rate for m, o in pairs if o.rate]
                by_cpu = [o.cpu_us / m.cpu_us for m, o in pairs if m.cpu_us]
                if not by_rate or not by_cpu:
                    continue
                judged = phase == opts.judged
                met = statistics.median(by_rate) >= TARGETS[mode]
                ok = ok and (met or not judged)
                mark = ("  met" if met else "  missed") if judged else ""
                print(
                    f"  {'':<16}{mode:>8}  rate {spread(by_rate, '{:.2f}'):<20}"
                    f"CPU {spread(by_cpu, '{:.2f}'):<20}{mark}"
                )
    print(
        f"  (targets: untraced ≥ {TARGETS['untraced']}, on ≥ {TARGETS['on']}, "
        f"judged on the {opts.judged} rates)"
    )
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tracing",
        description="The tracing budget: throughput kept, and mqtasks' own cost per span.",
    )
    p.add_argument(
        "--tasks", type=int, default=3000, help="tasks per throughput measurement (3000)"
    )
    p.add_argument("--brokers", default="memory,redis", help="comma-separated (memory,redis)")
    p.add_argument("--repeat", type=int, default=3, help="throughput rounds (3)")
    p.add_argument("--phases", default="drain,pipeline", help="throughput phases (drain,pipeline)")
    p.add_argument("--hook-tasks", type=int, default=2000, help="iterations per hook loop (2000)")
    p.add_argument("--hook-rounds", type=int, default=41, help="hook rounds (41)")
    p.add_argument("--only", choices=["hooks", "throughput"], help="run one part only")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (8)")
    p.add_argument("--publishers", type=int, default=2, help="publisher threads, pipeline (2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase (300)")
    p.add_argument("--stall", type=float, default=20.0, help="seconds without progress = stall")
    opts = p.parse_args(argv)
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    unknown = [b for b in opts.broker_list if b not in BROKERS]
    if unknown:
        p.error(f"unknown broker(s) {unknown}; choose from {sorted(BROKERS)}")
    opts.phase_list = [ph.strip() for ph in opts.phases.split(",") if ph.strip()]
    if any(ph not in ("publish", "drain", "pipeline") for ph in opts.phase_list):
        p.error(f"unknown phase(s) in {opts.phases!r}")
    # run_mode always times publish and drain; the pipeline, when named.
    opts.judged = "pipeline" if "pipeline" in opts.phase_list else "drain"
    return opts


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    run_id = uuid.uuid4().hex[:8]
    print(
        f"run {run_id}: sampler 1 in {round(1 / SAMPLE)} for throughput, ALWAYS_ON for hooks",
        flush=True,
    )
    ok = True
    if opts.only != "throughput":
        medians = print_hooks(
            run_hooks(opts.hook_tasks, opts.hook_rounds), "every span recorded (ALWAYS_ON)"
        )
        ok = all(m["hooks - empty span"] <= HOOK_TARGET_US for m in medians.values())
        # For the throughput figures: what the hooks cost when 1 trace in 10 is recorded.
        sampled = ParentBased(TraceIdRatioBased(SAMPLE))
        print_hooks(run_hooks(opts.hook_tasks, opts.hook_rounds, sampled), "1 trace in 10")
    if opts.only != "hooks":
        ok = print_throughput(run_throughput(opts, run_id), opts) and ok
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
