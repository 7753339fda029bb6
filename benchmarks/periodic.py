"""One scheduler with 1,000 ``every=1`` schedules: does it keep up, and at what CPU?

The target (issue 20): 1,000 schedules of ``every=1`` on one scheduler keep up, tick
lateness p99 <= 200 ms, with the scheduler's CPU under 25 % of one core.

Per broker (RabbitMQ, then Redis), with a queue, an app and a Redis backend key prefix
of the run's own:

1. an app with one task, ``bench.tick(i)`` (``ignore_result=True``), and 1,000
   schedules ``app.add_periodic(tick.s(i), every=1, name="s0000" ...)``;
2. :class:`mqtasks.scheduler.Scheduler` runs in this process (its thread, as
   ``mqtasks beat`` runs it), no worker: the ticks pile up in the queue;
3. after ``--warmup`` seconds (the lease is taken, the first turns are done), the
   window: ``--seconds`` of wall time, with this process's CPU time
   (``time.process_time``: every thread, the scheduler's and its broker and backend
   clients') measured over it;
4. a second of grace for the window's last ticks, then the scheduler stops (it
   releases its lease) and the queue's length is read, then the queue and every key
   of the run are deleted.

Lateness is what the scheduler reports: its ``periodic.sent`` log events (one per tick
the broker confirmed, with ``late_ms``: confirmation time minus tick time). The events
are rendered as JSON to ``/dev/null``, so the cost of a log line per tick is counted as
it is in ``mqtasks beat``. The ticks counted are those whose tick time falls in the
window (each whole second of it, times 1,000 schedules, is the expected count); a tick
sent twice (``resent``) or a tick id seen twice is reported.

``python -m benchmarks.periodic [--schedules 1000] [--seconds 30] [--warmup 10]
[--brokers amqp redis]``. Exit code 0 when every target is met.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import structlog

from mqtasks.transport.base import dead_letter_spec

from ._record import Log, measure, target_lines, target_row
from ._workers import percentiles
from .throughput import BROKERS, _sweep_redis

__all__ = ["CPU_TARGET", "LATE_P99_TARGET_MS", "SentEvents", "build_app", "main", "tick_time"]

#: The backend (and, for the Redis broker, the broker's database).
BACKEND_URL = BROKERS["redis"]
#: Target: the 99th percentile of tick lateness, milliseconds.
LATE_P99_TARGET_MS = 200.0
#: Target: the scheduler process's CPU, per cent of one core.
CPU_TARGET = 25.0


class SentEvents:
    """A structlog processor that keeps every ``periodic.sent`` event (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, logger: Any, method: str, event_dict: Any) -> Any:
        if event_dict.get("event") == "periodic.sent":
            with self._lock:
                self.events.append(dict(event_dict))
        return event_dict

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)


def configure_logging(capture: SentEvents) -> None:
    """Info and above, rendered as JSON lines to /dev/null, ``periodic.sent`` kept by ``capture``."""
    sink = open(os.devnull, "w")  # noqa: SIM115 - open for the life of the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            capture,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=sink),
        cache_logger_on_first_use=False,
    )


class Phases:
    """Times the parts of the scheduler's sending turns: wraps its calls on the instances."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []  # (part, start, end), time.time()

    def wrap(self, owner: Any, attribute: str, part: str) -> None:
        """Replace ``owner.attribute`` (a bound method) by one that records its start and end."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((part, start, time.time()))

        setattr(owner, attribute, timed)

    def turns(self, first: float, last: float) -> tuple[int, dict[str, dict[str, float]]]:
        """The sending turns that start in ``[first, last)``: their count, and the
        milliseconds of each part (percentiles over the turns).

        ``start``: from the tick (the whole second) to the turn's start; ``claim``: the
        fenced claim; ``build``: from the claim's end to the publish (building the
        messages); ``publish``: ``send_many`` until the last confirm; ``after``: from the
        publish's end to the turn's end (the log events, the fenced state write).
        """
        parts: dict[str, list[float]] = {}
        sending = 0
        turns = sorted(c for c in self.calls if c[0] == "turn" and first <= c[1] < last)
        for _, start, end in turns:
            inside = {
                p: (s, e) for p, s, e in self.calls if start <= s and e <= end and p != "turn"
            }
            if "claim" not in inside or "publish" not in inside:
                continue
            sending += 1
            claim, publish = inside["claim"], inside["publish"]
            for name, ms in (
                ("start", start - math.floor(start)),
                ("claim", claim[1] - claim[0]),
                ("build", publish[0] - claim[1]),
                ("publish", publish[1] - publish[0]),
                ("after", end - publish[1]),
                ("turn", end - start),
            ):
                parts.setdefault(name, []).append(ms * 1000)
        return sending, {name: percentiles(values) for name, values in parts.items()}


def tick_time(tick_id: str) -> float:
    """The tick time (epoch seconds) of ``periodic:<name>:<UTC ISO>``."""
    stamp = tick_id.rsplit(":", 3)
    iso = ":".join(stamp[-3:])  # the ISO time holds two colons itself
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def build_app(tag: str, url: str, schedules: int) -> Any:
    """An app with ``bench.tick`` and ``schedules`` schedules of ``every=1``, on queue ``tag``."""
    from mqtasks import App

    options = {"key_prefix": tag} if url.startswith("redis://") else {}
    app = App(
        "bench-periodic",
        broker=url,
        backend=BACKEND_URL,
        backend_key_prefix=f"{tag}:backend:",
        default_queue=tag,
        transport_options=options,
    )

    @app.task(name="bench.tick", ignore_result=True)
    def tick(i: int) -> None:
        return None

    for i in range(schedules):
        app.add_periodic(tick.s(i), every=1, name=f"s{i:04d}")
    return app


def run_broker(
    broker: str, schedules: int, warmup: float, seconds: float, capture: SentEvents, log: Log
) -> dict[str, Any]:
    """One scheduler, ``schedules`` schedules, on ``broker``: lateness, ticks and CPU."""
    from mqtasks.scheduler import Scheduler

    tag = f"bench-periodic-{uuid.uuid4().hex[:8]}-{broker}"
    url = BROKERS[broker]
    out: dict[str, Any] = {"broker": broker, "phase": "scheduler", "problems": []}
    app = build_app(tag, url, schedules)
    scheduler: Any = None
    try:
        app.declare()
        before = len(capture.snapshot())
        scheduler = Scheduler(app, owner=tag)
        phases = Phases()
        phases.wrap(scheduler, "turn", "turn")
        phases.wrap(app.backend, "claim_fenced", "claim")
        phases.wrap(app, "send_many", "publish")
        started = time.time()
        scheduler.start()
        time.sleep(warmup)
        load0 = os.getloadavg()[0]
        t0, wall0, cpu0 = time.time(), time.perf_counter(), time.process_time()
        time.sleep(seconds)
        t1, wall1, cpu1 = time.time(), time.perf_counter(), time.process_time()
        out["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        time.sleep(1.0)  # the window's last ticks, sent late, still count
        scheduler.stop()
        scheduler = None
        events = capture.snapshot()[before:]
        first, last = math.ceil(t0), math.floor(t1)  # ticks of whole seconds in [t0, t1]
        window = [e for e in events if first <= tick_time(e["tick_id"]) < last]
        ids = {e["tick_id"] for e in window}
        late = [float(e["late_ms"]) for e in window]
        out.update(
            schedules=schedules,
            window_s=round(wall1 - wall0, 3),
            expected=schedules * (last - first),
            sent=len(ids),
            sent_events=len(window),
            resent=sum(1 for e in window if e.get("resent")),
            late_ms=percentiles(late),
            cpu_pct=100.0 * (cpu1 - cpu0) / (wall1 - wall0),
            first_sent_after_s=(
                round(min(tick_time(e["tick_id"]) for e in events) - started, 3) if events else None
            ),
            in_queue=app.transport.message_counts([app.queue(tag)]).get(tag),
            sent_all=len(events),
        )
        out["sending_turns"], out["turn_ms"] = phases.turns(first, last)
        p = out["late_ms"]
        log(
            f"{out['sent']:,} of {out['expected']:,} ticks in {last - first} s "
            f"({out['sent_events'] - out['sent']} twice, {out['resent']} resent); "
            f"late ms p50 {p.get('p50', float('nan')):.1f} p99 {p.get('p99', float('nan')):.1f} "
            f"max {p.get('max', float('nan')):.1f}; CPU {out['cpu_pct']:.1f} % of one core; "
            f"in the queue {out['in_queue']:,} of {out['sent_all']:,} sent since start; "
            f"load average {out['load_average'][0]} to {out['load_average'][1]}"
        )
        parts = out["turn_ms"]
        log(
            "sending turns, ms p50/max: "
            + "; ".join(f"{k} {v['p50']:.1f}/{v['max']:.1f}" for k, v in parts.items())
            + f" ({out['sending_turns']} turns)"
        )
    finally:
        if scheduler is not None:
            try:
                scheduler.stop()
            except Exception as exc:  # reported, the clean-up goes on
                out["problems"].append(f"stop: {exc!r}")
        try:
            spec = app.queue(tag)
            app.transport.delete([spec, dead_letter_spec(spec)])
        except Exception as exc:  # reported, the run goes on
            out["problems"].append(f"delete: {exc!r}")
        app.close()
        _sweep_redis(BACKEND_URL, tag)
        if broker == "redis":
            _sweep_redis(url, tag)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run each broker in turn; print each figure, then the targets table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.periodic", description=__doc__)
    p.add_argument("--schedules", type=int, default=1000, help="schedules of every=1")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the window")
    p.add_argument("--brokers", nargs="+", default=["amqp", "redis"], choices=sorted(BROKERS))
    opts = p.parse_args(argv)
    capture = SentEvents()
    configure_logging(capture)
    rounds: list[dict[str, Any]] = []
    rows = []
    for broker in opts.brokers:

        def one(log: Log, broker: str = broker) -> dict[str, Any]:
            return run_broker(broker, opts.schedules, opts.warmup, opts.seconds, capture, log)

        r = measure(rounds, 0, broker, "scheduler", one)
        p99 = [r["late_ms"]["p99"]] if r.get("late_ms") else []
        cpu = [r["cpu_pct"]] if "cpu_pct" in r else []
        kept = [r["sent"] / r["expected"]] if r.get("expected") else []
        rows.append(target_row(broker, "sent / expected ticks", kept, "1.00", 1.0, "ge"))
        rows.append(
            target_row(broker, "tick lateness p99, ms", p99, "<= 200", LATE_P99_TARGET_MS, "le")
        )
        rows.append(target_row(broker, "CPU, % of one core", cpu, "< 25", CPU_TARGET, "le"))
    print(json.dumps(rounds, default=str))
    print("\n".join(target_lines(rows)))
    met = all(row["met"] for row in rows)
    print("PASS" if met else "FAIL")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
