"""Throughput of mqtasks against plain kombu, on the local RabbitMQ and Redis.

For each broker it measures, with the same messages (body, headers, properties):

* publish: ``noop.delay()`` in a loop, against a kombu ``Producer`` with
  ``confirm_publish=True`` (one confirm per message, as mqtasks does) and without confirms;
* drain: a :class:`~mqtasks.Worker` emptying a queue of N tasks, against a kombu
  ``Consumer`` with manual acks and the same prefetch;
* pipeline: publisher threads and a consumer at the same time, end to end.

Run ``python -m benchmarks.throughput --help``; see ``benchmarks/README.md``.
Absolute figures depend on the machine; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import kombu
import structlog

from mqtasks import App, Worker
from mqtasks.serialization import encode_body
from mqtasks.transport.queue import dead_letter_spec

#: The local brokers; nothing else is ever contacted.
BROKERS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/10",
}
#: Seconds between two looks at a progress counter (a local integer, not the broker).
POLL = 0.005


# -- results --------------------------------------------------------------------------


@dataclass
class Measurement:
    """One timed run of one side (mqtasks or kombu) of one phase."""

    broker: str
    phase: str
    side: str
    tasks: int
    seconds: float
    status: str = "ok"
    peak_rss_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Counter:
    """A thread-safe counter, bumped by the no-op task and the kombu callback alike."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self.value += 1


def publisher_threads(
    send: Callable[[], object],
    n: int,
    publishers: int,
    stop: threading.Event,
    errors: list[BaseException],
) -> list[threading.Thread]:
    """Return (unstarted) threads that call ``send()`` n times in all, until ``stop`` is set.

    A thread that fails appends its exception to ``errors`` and ends.
    """

    def publish(count: int) -> None:
        try:
            for _ in range(count):
                if stop.is_set():
                    return
                send()
        except BaseException as exc:
            errors.append(exc)

    return [
        threading.Thread(target=publish, args=(k,), name=f"bench-pub-{i}", daemon=True)
        for i, k in enumerate(split(n, publishers))
    ]


def wait_progress(
    read: Callable[[], int], target: int, deadline: float, stall: float
) -> tuple[str, float]:
    """Wait until ``read() >= target``; return (status, perf_counter at the end).

    Gives up at ``deadline`` (monotonic) or after ``stall`` seconds without progress.
    """
    last, last_change = read(), time.monotonic()
    while True:
        value = read()
        now = time.monotonic()
        if value >= target:
            return "ok", time.perf_counter()
        if value != last:
            last, last_change = value, now
        elif now - last_change > stall:
            return f"stalled at {value}/{target} for {stall:.0f}s", time.perf_counter()
        if now > deadline:
            return f"timeout at {value}/{target}", time.perf_counter()
        time.sleep(POLL)


def bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; raise TimeoutError if it outlasts ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"bench-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- mqtasks side ---------------------------------------------------------------------


class MqtasksSide:
    """An app with one no-op task on its own queue."""

    def __init__(self, url: str, queue: str, warm_queue: str, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.queue = queue
        self.warm_queue = warm_queue
        self.app = App("bench", broker=url, default_queue=queue, queue_type="quorum")
        self.ran = Counter()
        ran = self.ran

        @self.app.task(name="bench.noop")
        def noop() -> None:
            ran.bump()

        self.noop = noop

    def setup(self) -> None:
        self.app.declare()
        # Connect the publishing pool outside the timed loop, through the public API.
        self.noop.apply_async(queue=self.warm_queue)

    def template(self) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """Return the body, headers and properties of a ``noop.delay()`` message."""
        message = self.noop.message()
        body = encode_body(message.args, dict(message.kwargs), max_size=1 << 20)
        envelope = message.to_envelope(body)
        props = {
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "priority": envelope.priority,
        }
        return envelope.body, dict(envelope.headers), props

    def publish(self, broker: str, n: int) -> Measurement:
        deadline = time.monotonic() + self.opts.timeout
        delay = self.noop.delay
        sent, status = 0, "ok"
        t0 = time.perf_counter()
        for sent in range(1, n + 1):
            delay()
            if not sent & 255 and time.monotonic() > deadline:
                status = f"timeout at {sent}/{n}"
                break
        seconds = time.perf_counter() - t0
        return Measurement(broker, "publish", "mqtasks", sent, seconds, status, peak_rss_mib())

    def worker(self) -> Worker:
        return Worker(
            self.app,
            concurrency=self.opts.concurrency,
            prefetch=self.opts.prefetch,
            shutdown_timeout=10.0,
        )

    def stop(self, worker: Worker) -> None:
        clean = bounded(worker.stop, 30.0, "worker.stop")
        if not clean:
            print(f"  warning: worker.stop() was not clean ({worker!r})", file=sys.stderr)

    def drain(self, broker: str, n: int) -> Measurement:
        ready = self.app.transport.message_counts([self.app.queue(self.queue)])[self.queue]
        worker = self.worker()
        try:
            worker.start(timeout=30.0)
            t0, s0 = time.perf_counter(), worker.settled
            status, t1 = wait_progress(
                lambda: worker.settled,
                n,
                time.monotonic() + self.opts.timeout,
                self.opts.stall,
            )
            done = worker.settled - s0
            extra = {
                "ready_before": ready,
                "received": worker.received,
                "settled": worker.settled,
                "running_at_end": worker.running,
            }
        finally:
            self.stop(worker)
        return Measurement(broker, "drain", "mqtasks", done, t1 - t0, status, peak_rss_mib(), extra)

    def pipeline(self, broker: str, n: int) -> Measurement:
        worker = self.worker()
        errors: list[BaseException] = []
        stop = threading.Event()
        threads = publisher_threads(self.noop.delay, n, self.opts.publishers, stop, errors)
        try:
            worker.start(timeout=30.0)
            s0 = worker.settled
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            status, t1 = wait_progress(
                lambda: worker.settled - s0,
                n,
                time.monotonic() + self.opts.timeout,
                self.opts.stall,
            )
            done = worker.settled - s0
        finally:
            stop.set()
            for t in threads:
                t.join(15.0)
            self.stop(worker)
        if errors:
            status = f"publisher error: {errors[0]!r}"
        return Measurement(broker, "pipeline", "mqtasks", done, t1 - t0, status, peak_rss_mib())

    def cleanup(self) -> None:
        names = [self.queue, self.warm_queue]
        # The dead-letter queue a worker declares beside each queue goes too.
        specs = [self.app.queue(q) for q in names]
        specs += [dead_letter_spec(spec) for spec in specs]
        try:
            bounded(
                lambda: self.app.transport.delete(specs),
                30.0,
                "delete mqtasks queues",
            )
        finally:
            bounded(self.app.close, 30.0, "app.close")


# -- kombu side -----------------------------------------------------------------------


class KombuSide:
    """Plain kombu with the messages mqtasks sends: no task layer, no threads of its own."""

    def __init__(
        self,
        url: str,
        queue: str,
        warm_queue: str,
        template: tuple[bytes, dict[str, Any], dict[str, Any]],
        opts: argparse.Namespace,
    ) -> None:
        self.url = url
        self.opts = opts
        self.amqp = url.startswith("amqp")
        self.body, self.headers, self.props = template
        self.queue = self._queue(queue)
        self.warm_queue = self._queue(warm_queue)

    def _queue(self, name: str) -> kombu.Queue:
        return kombu.Queue(
            name,
            exchange=kombu.Exchange(""),
            routing_key=name,
            durable=True,
            auto_delete=False,
            queue_arguments={"x-queue-type": "quorum"} if self.amqp else None,
        )

    def connection(self, *, confirm: bool = False) -> kombu.Connection:
        options = {"confirm_publish": True} if confirm and self.amqp else {}
        return kombu.Connection(self.url, connect_timeout=5, transport_options=options)

    def setup(self) -> None:
        with self.connection() as conn:
            conn.ensure_connection(max_retries=3)
            channel = conn.default_channel
            self.queue.bind(channel).declare()
            self.warm_queue.bind(channel).declare()

    def _send(self, producer: kombu.Producer, routing_key: str) -> None:
        headers = dict(self.headers)
        headers["mqtasks-published-at"] = time.time()
        producer.publish(
            self.body,
            exchange="",
            routing_key=routing_key,
            headers=headers,
            message_id=str(uuid.uuid4()),
            delivery_mode=2,
            mandatory=self.amqp,
            timeout=10,
            confirm_timeout=10,
            **self.props,
        )

    def _publish_loop(self, n: int, *, confirm: bool, stop: threading.Event | None) -> int:
        with self.connection(confirm=confirm) as conn:
            conn.ensure_connection(max_retries=3)
            channel = conn.channel()
            producer = kombu.Producer(channel, auto_declare=False)
            deadline = time.monotonic() + self.opts.timeout
            sent = 0
            for sent in range(1, n + 1):
                self._send(producer, self.queue.name)
                if not sent & 255 and (time.monotonic() > deadline or (stop and stop.is_set())):
                    break
            return sent

    def publish(self, broker: str, n: int, *, confirm: bool) -> Measurement:
        phase = "publish" if confirm or not self.amqp else "publish-noconfirm"
        with self.connection(confirm=confirm) as conn:
            conn.ensure_connection(max_retries=3)
            channel = conn.channel()
            producer = kombu.Producer(channel, auto_declare=False)
            self._send(producer, self.warm_queue.name)  # first publish outside the timing
            deadline = time.monotonic() + self.opts.timeout
            sent, status = 0, "ok"
            t0 = time.perf_counter()
            for sent in range(1, n + 1):
                self._send(producer, self.queue.name)
                if not sent & 255 and time.monotonic() > deadline:
                    status = f"timeout at {sent}/{n}"
                    break
            if self.amqp and not confirm:
                # A synchronous round trip on the same channel: the broker has read every
                # publish before it answers.
                self.queue.bind(channel).queue_declare(passive=True)
            seconds = time.perf_counter() - t0
        return Measurement(broker, phase, "kombu", sent, seconds, status, peak_rss_mib())

    def ready(self, queue: kombu.Queue | None = None) -> int:
        queue = queue or self.queue
        with self.connection() as conn:
            channel = conn.default_channel
            if self.amqp:
                _, count, _ = queue.bind(channel).queue_declare(passive=True)
                return int(count or 0)
            return int(channel._size(queue.name))

    def purge(self) -> None:
        with self.connection() as conn:
            self.queue.bind(conn.default_channel).purge()

    @contextlib.contextmanager
    def consuming(self, counter: Counter) -> Iterator[kombu.Connection]:
        """Consume the queue with manual acks and the worker's prefetch."""

        def on_message(message: Any) -> None:
            json.loads(message.body)  # what a task layer does at the least
            message.ack()
            counter.bump()

        with self.connection() as conn:
            conn.ensure_connection(max_retries=3)
            channel = conn.channel()
            consumer = kombu.Consumer(
                channel,
                queues=[self.queue.bind(channel)],
                no_ack=False,
                auto_declare=False,
                on_message=on_message,
            )
            consumer.qos(prefetch_count=self.opts.prefetch)
            consumer.consume()
            try:
                yield conn
            finally:
                with contextlib.suppress(Exception):
                    consumer.cancel()

    def _drain_until(
        self, conn: kombu.Connection, counter: Counter, target: int, stop: threading.Event
    ) -> None:
        deadline = time.monotonic() + self.opts.timeout
        while counter.value < target and not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout, TimeoutError):
                conn.drain_events(timeout=0.5)

    def drain(self, broker: str, n: int) -> Measurement:
        ready = self.ready()
        counter = Counter()
        stop = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with self.consuming(counter) as conn:
                    self._drain_until(conn, counter, n, stop)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        # The consumer runs in a thread so that the end is observed the same way as
        # for mqtasks; it does all the work itself.
        thread = threading.Thread(target=consume, name="bench-kombu-consumer", daemon=True)
        t0 = time.perf_counter()
        thread.start()
        status, t1 = wait_progress(
            lambda: counter.value if not errors else -1,
            n,
            time.monotonic() + self.opts.timeout,
            self.opts.stall,
        )
        stop.set()
        thread.join(15.0)
        if errors:
            status = f"consumer error: {errors[0]!r}"
        extra = {"ready_before": ready}
        return Measurement(
            broker, "drain", "kombu", counter.value, t1 - t0, status, peak_rss_mib(), extra
        )

    def pipeline(self, broker: str, n: int) -> Measurement:
        counter = Counter()
        stop = threading.Event()
        consuming = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with self.consuming(counter) as conn:
                    consuming.set()
                    self._drain_until(conn, counter, n, stop)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                consuming.set()

        def publish(count: int) -> None:
            try:
                self._publish_loop(count, confirm=True, stop=stop)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        consumer = threading.Thread(target=consume, name="bench-kombu-consumer", daemon=True)
        publishers = [
            threading.Thread(target=publish, args=(k,), name=f"bench-kombu-pub-{i}", daemon=True)
            for i, k in enumerate(split(n, self.opts.publishers))
        ]
        consumer.start()
        consuming.wait(30.0)
        t0 = time.perf_counter()
        for t in publishers:
            t.start()
        status, t1 = wait_progress(
            lambda: counter.value if not errors else -1,
            n,
            time.monotonic() + self.opts.timeout,
            self.opts.stall,
        )
        stop.set()
        for t in [*publishers, consumer]:
            t.join(15.0)
        if errors:
            status = f"error: {errors[0]!r}"
        return Measurement(
            broker, "pipeline", "kombu", counter.value, t1 - t0, status, peak_rss_mib()
        )

    def cleanup(self) -> None:
        for queue in (self.queue, self.warm_queue):
            try:
                with self.connection() as conn:
                    queue.bind(conn.default_channel).delete()
            except Exception as exc:
                print(f"  warning: could not delete {queue.name}: {exc!r}", file=sys.stderr)


# -- one broker -----------------------------------------------------------------------


def run_broker(
    broker: str, opts: argparse.Namespace, run_id: str, results: list[Measurement]
) -> None:
    """Run every phase on one broker, appending to ``results`` as it goes."""
    url = BROKERS[broker]
    prefix = f"bench-{run_id}-{broker}"
    n = opts.tasks
    mq = MqtasksSide(url, f"{prefix}-mqtasks", f"{prefix}-mqtasks-warm", opts)
    kb: KombuSide | None = None

    def record(m: Measurement) -> Measurement:
        results.append(m)
        flag = "" if m.status == "ok" else f"  [{m.status}]"
        print(
            f"  {m.broker:<5} {m.phase:<17} {m.side:<7} {m.tasks:>7} tasks "
            f"{m.seconds:8.2f} s {m.rate:10,.0f}/s  rss {m.peak_rss_mib:6.1f} MiB{flag}",
            flush=True,
        )
        return m

    try:
        mq.setup()
        kb = KombuSide(url, f"{prefix}-kombu", f"{prefix}-kombu-warm", mq.template(), opts)
        kb.setup()
        for r in range(opts.repeat):
            if opts.repeat > 1:
                print(f"  -- {broker} round {r + 1}/{opts.repeat}", flush=True)
            # Alternate the sides phase by phase, so that drift hits both alike.
            published = record(mq.publish(broker, n)).tasks
            record(kb.publish(broker, n, confirm=True))
            record(mq.drain(broker, published))
            record(kb.drain(broker, n))
            if kb.amqp:
                m = record(kb.publish(broker, n, confirm=False))
                got = kb.ready()
                m.extra["ready_after"] = got
                if got != m.tasks:
                    print(f"  note: {got} of {m.tasks} unconfirmed messages counted", flush=True)
                kb.purge()
            record(mq.pipeline(broker, n))
            record(kb.pipeline(broker, n))
            settled = sum(
                m.extra.get("settled", m.tasks)
                for m in results
                if m.broker == broker and m.side == "mqtasks" and m.phase in ("drain", "pipeline")
            )
            if mq.ran.value != settled:
                print(
                    f"  note: the task ran {mq.ran.value} times for {settled} settled", flush=True
                )
    finally:
        for side in (mq, kb):
            if side is None:
                continue
            try:
                side.cleanup()
            except Exception as exc:
                print(f"  warning: cleanup of {broker} failed: {exc!r}", file=sys.stderr)
        if broker == "redis":
            _sweep_redis(url, prefix)


def _sweep_redis(url: str, prefix: str) -> None:
    """Delete any key this run left in the Redis database (queue lists and the like)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:
        print(f"  warning: redis sweep failed: {exc!r}", file=sys.stderr)


# -- report ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kombu": version("kombu"),
        "amqp": version("amqp"),
        "redis-py": version("redis"),
        "mqtasks": version("mqtasks"),
        "commit": _git_commit(),
    }
    with (
        contextlib.suppress(Exception),
        kombu.Connection(BROKERS["amqp"], connect_timeout=3) as conn,
    ):
        conn.ensure_connection(max_retries=1)
        info["rabbitmq"] = conn.connection.server_properties.get("version")
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(BROKERS["redis"], socket_timeout=3)
        info["redis_server"] = client.info("server").get("redis_version")
        client.close()
    return info


def _git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when mqtasks/ has local changes), if any."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "mqtasks"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


PHASES = [
    ("publish", "publish", "publish", "publish (kombu confirm/msg)"),
    ("publish", "publish", "publish-noconfirm", "publish (kombu no confirms)"),
    ("drain", "drain", "drain", "drain"),
    ("pipeline", "pipeline", "pipeline", "pipeline"),
]


def summarise(results: list[Measurement], brokers: list[str]) -> list[dict[str, Any]]:
    """One row per broker and phase: median rates over the rounds and their ratio."""
    rows = []
    for broker in brokers:
        for _, mq_phase, kb_phase, label in PHASES:
            mq = [
                m
                for m in results
                if m.broker == broker and m.side == "mqtasks" and m.phase == mq_phase
            ]
            kb = [
                m
                for m in results
                if m.broker == broker and m.side == "kombu" and m.phase == kb_phase
            ]
            if not mq or not kb:
                continue
            mq_rate = statistics.median(m.rate for m in mq)
            kb_rate = statistics.median(m.rate for m in kb)
            bad = [f"{m.side}: {m.status}" for m in mq + kb if m.status != "ok"]
            if broker != "amqp" and mq_phase == "publish":
                label = "publish (no confirms exist)"
            rows.append(
                {
                    "broker": broker,
                    "phase": label,
                    "mqtasks_per_s": round(mq_rate, 1),
                    "kombu_per_s": round(kb_rate, 1),
                    "ratio": round(mq_rate / kb_rate, 3) if kb_rate else None,
                    "problems": bad,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'broker':<7} {'phase':<28} {'mqtasks/s':>10} {'kombu/s':>10} {'mqtasks/kombu':>14}")
    print("-" * 73)
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        mark = " *" if row["problems"] else ""
        print(
            f"{row['broker']:<7} {row['phase']:<28} {row['mqtasks_per_s']:>10,.0f} "
            f"{row['kombu_per_s']:>10,.0f} {ratio:>14}{mark}"
        )
    for row in rows:
        for problem in row["problems"]:
            print(f"* {row['broker']} {row['phase']}: {problem}")


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Throughput of mqtasks against plain kombu on the local RabbitMQ and Redis.",
    )
    p.add_argument("--tasks", type=int, default=20_000, help="tasks per measurement (20000)")
    p.add_argument("--brokers", default="amqp,redis", help="comma-separated: amqp,redis")
    p.add_argument("--repeat", type=int, default=1, help="rounds per broker; medians reported")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (8)")
    p.add_argument("--prefetch", type=int, default=None, help="prefetch (2 x concurrency)")
    p.add_argument("--publishers", type=int, default=2, help="publisher threads in pipeline (2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase (300)")
    p.add_argument("--stall", type=float, default=20.0, help="seconds without progress = stall")
    opts = p.parse_args(argv)
    opts.prefetch = opts.prefetch or 2 * opts.concurrency
    opts.broker_list = [b.strip() for b in opts.brokers.split(",") if b.strip()]
    unknown = [b for b in opts.broker_list if b not in BROKERS]
    if unknown:
        p.error(f"unknown broker(s) {unknown}; choose from {sorted(BROKERS)}")
    if opts.tasks < 1 or opts.repeat < 1 or opts.publishers < 1:
        p.error("--tasks, --repeat and --publishers must be at least 1")
    for url in BROKERS.values():
        host = urlsplit(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"refusing non-loopback broker {host}")
    return opts


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # The worker logs at info level; keep the output to the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # `kill` cleans up like Ctrl-C: queues deleted, workers stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    run_id = uuid.uuid4().hex[:8]
    info = machine_info()
    rss_start = peak_rss_mib()
    print(
        f"mqtasks {info['mqtasks']} | kombu {info['kombu']} | amqp {info['amqp']} | "
        f"redis-py {info['redis-py']} | Python {info['python']} | nproc {info['nproc']} | "
        f"commit {info['commit']} | "
        f"RabbitMQ {info.get('rabbitmq', '?')} | Redis {info.get('redis_server', '?')} | "
        f"load {info['loadavg']}"
    )
    print(
        f"run {run_id}: {opts.tasks} tasks, concurrency {opts.concurrency}, prefetch "
        f"{opts.prefetch}, {opts.publishers} pipeline publisher(s), {opts.repeat} round(s)",
        flush=True,
    )
    results: list[Measurement] = []
    status = 0
    try:
        for broker in opts.broker_list:
            run_broker(broker, opts, run_id, results)
    except KeyboardInterrupt:
        print("interrupted; queues deleted", file=sys.stderr)
        status = 130
    except Exception as exc:
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        status = 1
    rows = summarise(results, opts.broker_list)
    print_table(rows)
    rss_end = peak_rss_mib()
    print(
        f"\npeak RSS of the benchmark process (worker, publishers and kombu baseline): "
        f"{rss_end:.1f} MiB (after imports: {rss_start:.1f} MiB)"
    )
    if opts.json:
        doc = {
            "run_id": run_id,
            "machine": info,
            "options": {k: v for k, v in vars(opts).items() if k not in ("json", "broker_list")},
            "peak_rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
            "summary": rows,
            "measurements": [
                {**asdict(m), "rate": round(m.rate, 1), "seconds": round(m.seconds, 4)}
                for m in results
            ],
        }
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {opts.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
