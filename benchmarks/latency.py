"""Where the time of one confirmed ``delay()`` goes on an idle RabbitMQ: the client or the broker.

Issue 15 asks for the p50 of one ``delay()`` split into client time and broker
time, on quorum and classic queues, set against plain kombu's
``Producer.publish`` with ``confirm_publish=True`` on the same queue types in
the same run. This script publishes ``--samples`` messages one at a time, no
worker running, taking the four variants (mqtasks and kombu, quorum and classic)
in turn for every sample so that drift on the shared machine touches them alike.

For each call it takes:

* **wall**: ``perf_counter`` around the call (``noop.delay(...)`` or
  ``producer.publish(...)``);
* **broker**: from the end of the last ``sendall()`` of the call (the publish
  frames written) to the return of the first ``recv()`` after it that brought
  bytes (the confirm read). Both clients write and read py-amqp's socket, so it
  is timed by giving py-amqp a socket subclass (in this process only) whose
  ``sendall``/``recv`` note the time; the subclass costs well under a µs a call.
  It includes the loopback TCP hops and the wake-up of the waiting thread, which
  the broker does not own but no client can avoid;
* **client**: wall minus broker, what the library spends building, writing and
  reading the message;
* **CPU**: ``time.thread_time()`` around the call.

``--delivery N`` then purges the queues, starts a kombu consumer on each (its
own connection and thread, no acks) and publishes N more per variant, one at a
time, each waited for until delivered: the **send-to-delivery** time, where a
quorum queue's commit shows (the broker delivers a message once it is committed).

``--profile PATH`` also runs cProfile over ``--samples`` quorum ``delay()``
calls afterwards (and kombu's publish over as many, to ``PATH.kombu``) and
prints the top functions by own time.

Run ``python -m benchmarks.latency --help``. The queues are the run's own
(``bench-lat-<run>-...``) and deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import pstats
import resource
import socket
import statistics
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import amqp.transport
import kombu
import structlog

from ._systems import kombu_sender, mqtasks_message_fields
from .throughput import BROKERS, machine_info

QUEUE_TYPES = ("quorum", "classic")


# -- timing the socket ------------------------------------------------------------------------


class Marks:
    """The times of the last write and of the first read after it, in this process."""

    write_end = 0.0
    read_end = 0.0

    @classmethod
    def reset(cls) -> None:
        cls.write_end = cls.read_end = 0.0


class TimedSocket(socket.socket):
    """A socket noting when a ``sendall()`` ended and the first ``recv()`` after it returned."""

    __slots__ = ()

    def sendall(self, data: Any, flags: int = 0) -> None:
        super().sendall(data, flags)
        Marks.write_end = time.perf_counter()
        Marks.read_end = 0.0

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        if data and Marks.write_end and not Marks.read_end:
            Marks.read_end = time.perf_counter()
        return data


@contextlib.contextmanager
def timed_sockets() -> Iterator[None]:
    """Give py-amqp (only) the timing socket for the connections opened meanwhile."""
    shim = types.ModuleType("socket")
    shim.__dict__.update(socket.__dict__)
    shim.socket = TimedSocket  # type: ignore[attr-defined]
    original = amqp.transport.socket
    amqp.transport.socket = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        amqp.transport.socket = original  # type: ignore[attr-defined]


# -- the publishers ---------------------------------------------------------------------------

Publish = Callable[[int], None]


def mqtasks_publisher(url: str, queue: str, queue_type: str) -> tuple[Publish, Callable[[], None]]:
    """``noop.delay(seq, sent)`` on ``queue``, mqtasks' defaults but for the queue type."""
    from mqtasks import App
    from mqtasks.transport.queue import QueueSpec, dead_letter_spec

    app = App("bench-lat", broker=url, queues=[QueueSpec(queue, queue_type=queue_type)])  # type: ignore[arg-type]

    @app.task(name="bench.noop", queue=queue)
    def noop(seq: int, sent: float) -> None:
        """Never run: nothing consumes the queue."""

    app.declare()

    def publish(seq: int) -> None:
        noop.delay(seq, time.time())

    def close() -> None:
        with contextlib.suppress(Exception):
            spec = app.queue(queue)
            app.transport.delete([spec, dead_letter_spec(spec)])  # declared beside it
        app.close()

    return publish, close


def kombu_publisher(url: str, queue: str, queue_type: str) -> tuple[Publish, Callable[[], None]]:
    """kombu's ``Producer.publish`` with ``confirm_publish=True``, the message mqtasks sends."""
    headers, props = mqtasks_message_fields(queue)
    conn = kombu.Connection(url, connect_timeout=5, transport_options={"confirm_publish": True})
    conn.ensure_connection(max_retries=3)
    kqueue = kombu.Queue(
        queue,
        exchange=kombu.Exchange(""),
        routing_key=queue,
        durable=True,
        queue_arguments={"x-queue-type": queue_type},
    )
    kqueue.bind(conn.channel()).declare()
    send = kombu_sender(
        kombu.Producer(conn.channel(), auto_declare=False), queue, headers, props, True
    )

    def publish(seq: int) -> None:
        send(seq, time.time())

    def close() -> None:
        with contextlib.suppress(Exception):
            kqueue.bind(conn.channel()).delete()
        conn.release()

    return publish, close


# -- measuring --------------------------------------------------------------------------------


def measure(publish: Publish, seq: int) -> dict[str, float]:
    """Time one call: wall, broker, client and CPU (and its user/kernel split), in ms."""
    Marks.reset()
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    publish(seq)
    t1 = time.perf_counter()
    cpu = time.thread_time() - cpu0
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    wall = t1 - t0
    broker = Marks.read_end - Marks.write_end if Marks.read_end and Marks.write_end else 0.0
    return {
        "wall": wall * 1e3,
        "broker": broker * 1e3,
        "client": (wall - broker) * 1e3,
        "cpu": cpu * 1e3,
        # The kernel splits a thread's time into user and system by sampling: only
        # the mean over many calls means something.
        "cpu_user": (ru1.ru_utime - ru0.ru_utime) * 1e3,
        "cpu_sys": (ru1.ru_stime - ru0.ru_stime) * 1e3,
    }


class Deliveries:
    """A consumer per queue, each on its own connection and thread, noting when messages arrive.

    For the send-to-delivery pass: ``time.time()`` at arrival minus the ``sent``
    the publisher put in the message's arguments just before its call.
    """

    def __init__(self, url: str, queues: list[str]) -> None:
        self.cond = threading.Condition()
        #: Send-to-delivery seconds by (queue, seq).
        self.arrived: dict[tuple[str, int], float] = {}
        self._stop = False
        self._conns: list[kombu.Connection] = []
        self._threads: list[threading.Thread] = []
        for queue in queues:
            conn = kombu.Connection(url, connect_timeout=5)
            conn.ensure_connection(max_retries=3)
            channel = conn.channel()
            channel.queue_purge(queue)  # the first pass's messages
            consumer = kombu.Consumer(
                channel,
                queues=[kombu.Queue(queue, no_declare=True)],
                on_message=partial(self._on_message, queue),
                no_ack=True,
            )
            consumer.consume()
            thread = threading.Thread(target=self._drain, args=(conn,), daemon=True)
            self._conns.append(conn)
            self._threads.append(thread)
            thread.start()

    def _on_message(self, queue: str, message: Any) -> None:
        now = time.time()
        seq, sent = json.loads(message.body)["args"]
        with self.cond:
            self.arrived[(queue, seq)] = now - sent
            self.cond.notify_all()

    def _drain(self, conn: kombu.Connection) -> None:
        while not self._stop:
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=0.2)

    def wait(self, queue: str, seq: int, timeout: float = 10.0) -> float | None:
        """Seconds from send to delivery of ``seq`` on ``queue``; None if it did not come."""
        with self.cond:
            self.cond.wait_for(lambda: (queue, seq) in self.arrived, timeout)
            return self.arrived.get((queue, seq))

    def close(self) -> None:
        self._stop = True
        for thread in self._threads:
            thread.join(5)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.release()


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarise(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "p50": statistics.median(s[key] for s in samples),
            "p99": p([s[key] for s in samples], 0.99),
            "mean": statistics.fmean(s[key] for s in samples),
        }
        for key in ("wall", "broker", "client", "cpu", "cpu_user", "cpu_sys")
    }


def profile(publish: Publish, count: int, path: str, label: str) -> None:
    """cProfile ``count`` calls of ``publish``; write the stats and print the top of them."""
    prof = cProfile.Profile()
    prof.enable()
    for k in range(count):
        publish(1_000_000 + k)
    prof.disable()
    prof.dump_stats(path)
    print(f"\ncProfile of {count} calls, {label} (own time, top 25; {path}):")
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--samples", type=int, default=500, help="calls per variant (500)")
    ap.add_argument("--warmup", type=int, default=20, help="calls per variant not counted (20)")
    ap.add_argument("--pause", type=float, default=0.002, help="seconds between two calls (0.002)")
    ap.add_argument("--queue-types", default="quorum,classic", help="quorum,classic")
    ap.add_argument(
        "--delivery",
        type=int,
        default=0,
        metavar="N",
        help="then N messages per variant timed from send to delivery to a consumer (0: none)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the figures and every sample")
    ap.add_argument("--profile", metavar="PATH", help="also cProfile quorum calls into PATH")
    opts = ap.parse_args(argv)
    queue_types = [q for q in opts.queue_types.split(",") if q]
    if any(q not in QUEUE_TYPES for q in queue_types) or opts.samples < 1:
        ap.error("--queue-types takes quorum and/or classic; --samples at least 1")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    url = BROKERS["amqp"]
    run_id = uuid.uuid4().hex[:8]
    info = machine_info()
    print(
        f"mqtasks {info['mqtasks']} (commit {info['commit']}) | kombu {info['kombu']} | "
        f"RabbitMQ {info.get('rabbitmq', '?')} | Python {info['python']} | "
        f"load {info['loadavg']} | {opts.samples} calls per variant, {opts.pause * 1e3:.1f} ms apart",
        flush=True,
    )
    variants: dict[str, tuple[Publish, Callable[[], None]]] = {}
    queues: dict[str, str] = {}
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        with timed_sockets():
            for qt in queue_types:
                for lib, make in (("mqtasks", mqtasks_publisher), ("kombu", kombu_publisher)):
                    name = f"{lib} {qt}"
                    queues[name] = f"bench-lat-{run_id}-{lib}-{qt}"
                    variants[name] = make(url, queues[name], qt)
                    samples[name] = []
            for k in range(opts.warmup + opts.samples):
                for name, (publish, _) in variants.items():
                    figures = measure(publish, k)
                    if k >= opts.warmup:
                        samples[name].append(figures)
                    time.sleep(opts.pause)
        summary = {name: summarise(s) for name, s in samples.items()}
        print(
            "\nms per call, p50 (p99 in brackets); client = wall - broker; CPU = thread time, "
            "and its mean split into user + kernel"
        )
        head = f"{'variant':<16} {'wall':>15} {'broker':>15} {'client':>15} {'CPU':>15}"
        print(f"{head} {'user + kernel':>15}")
        for name, s in summary.items():
            cells = " ".join(
                f"{s[k]['p50']:>6.3f} ({s[k]['p99']:>6.3f})"
                for k in ("wall", "broker", "client", "cpu")
            )
            split = f"{s['cpu_user']['mean']:.3f} + {s['cpu_sys']['mean']:.3f}"
            print(f"{name:<16} {cells} {split:>15}")
        print("\nmqtasks / kombu on the same queue type (p50):")
        for qt in queue_types:
            a, b = summary[f"mqtasks {qt}"], summary[f"kombu {qt}"]
            ratios = ", ".join(
                f"{k} {a[k]['p50'] / b[k]['p50']:.2f} ({(a[k]['p50'] - b[k]['p50']) * 1e3:+.0f} µs)"
                for k in ("wall", "broker", "client", "cpu")
            )
            print(f"  {qt}: {ratios}")
        if "quorum" in queue_types and "classic" in queue_types:
            print("\nquorum - classic (p50):")
            for lib in ("mqtasks", "kombu"):
                a, b = summary[f"{lib} quorum"], summary[f"{lib} classic"]
                wall = a["wall"]["p50"] - b["wall"]["p50"]
                broker = a["broker"]["p50"] - b["broker"]["p50"]
                print(f"  {lib}: wall {wall:+.3f} ms, broker {broker:+.3f} ms")
        if opts.delivery:
            print(
                "\nsend to delivery, one message at a time, a kombu consumer on its own "
                "connection (no acks): p50 (p99) ms"
            )
            deliveries = Deliveries(url, list(queues.values()))
            late: dict[str, list[float]] = {name: [] for name in variants}
            try:
                for k in range(opts.warmup + opts.delivery):
                    for name, (publish, _) in variants.items():
                        seq = 2_000_000 + k
                        publish(seq)
                        took = deliveries.wait(queues[name], seq)
                        if took is not None and k >= opts.warmup:
                            late[name].append(took * 1e3)
                        time.sleep(opts.pause)
            finally:
                deliveries.close()
            for name, values in late.items():
                if values:
                    d = summary[name]["delivery"] = {
                        "p50": statistics.median(values),
                        "p99": p(values, 0.99),
                        "mean": statistics.fmean(values),
                    }
                    missing = opts.delivery - len(values)
                    print(
                        f"  {name:<16} {d['p50']:.3f} ({d['p99']:.3f})"
                        + (f", {missing} not delivered in 10 s" if missing else "")
                    )
        if opts.profile:
            qt = queue_types[0]
            profile(
                variants[f"mqtasks {qt}"][0], opts.samples, opts.profile, f"mqtasks delay(), {qt}"
            )
            profile(
                variants[f"kombu {qt}"][0],
                opts.samples,
                opts.profile + ".kombu",
                f"kombu publish, {qt}",
            )
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump(
                    {
                        "machine": info,
                        "options": vars(opts),
                        "summary": summary,
                        "samples": samples,
                    },
                    fh,
                    indent=1,
                )
            print(f"wrote {opts.json}")
    finally:
        for _, close in variants.values():
            with contextlib.suppress(Exception):
                close()
        with open("/proc/loadavg") as fh:
            print(f"load at the end {fh.read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
