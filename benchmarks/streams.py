"""Streams against plain events, on one broker, in one run: emit and consume rates.

For each broker (RabbitMQ stream queues, Redis Streams), in this process:

* emit: ``N`` events emitted one after the other by one thread, confirmed each,
  with ``app.emit(key, payload)`` (a topic exchange, one subscriber queue bound)
  and with ``app.emit(key, payload, stream=...)``.
* consume: ``N`` events waiting (in the subscriber's queue; in the stream), then
  a worker (``-c 8``, prefetch 100) started with a no-op subscriber; the time
  from its start to the ``N``-th run. For a stream this includes the group's
  pump: read, filter, publish to the subscriber's queue, commit.

Figures are rates (events/s) and the stream's rate as a ratio to the plain
events' rate, measured in the same run::

    python -m benchmarks.streams --brokers amqp,redis -n 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from typing import Any

from mqtasks import App, StreamSpec, Worker
from mqtasks.logging import configure_logging
from mqtasks.transport.base import DLQ_SUFFIX
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisTransport
from mqtasks.transport.redis.exchanges import exchange_key

URLS = {"amqp": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/0"}


def _app(url: str, run: str) -> App:
    return App(
        "bench",
        broker=url,
        events_exchange=f"bench-{run}-x",
        default_queue=f"bench-{run}-default",
        streams=[StreamSpec(f"bench-{run}")],
    )


def _consume(app: App, n: int, queue: str) -> float:
    """Start a worker on ``queue`` and return seconds until ``n`` runs."""
    done = threading.Event()
    count = [0]
    lock = threading.Lock()
    sub = app.subscriptions.for_queue(queue)
    assert sub is not None

    def count_one(_event: Any) -> None:
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    sub.task.fn = count_one  # type: ignore[misc]  # the registered no-op, counting
    worker = Worker(app, queues=[queue], concurrency=8, prefetch=100)
    start = time.perf_counter()
    worker.start()
    done.wait(600)
    elapsed = time.perf_counter() - start
    worker.stop()
    return elapsed


def _delete_exchange(app: App) -> None:
    """Remove the run's events exchange (its bindings, and the exchange or its Redis key)."""
    transport, exchange = app.transport, app.settings.events_exchange
    for pattern, queue in transport.bindings(exchange):
        transport.unbind(exchange, pattern, queue)
    if isinstance(transport, RedisTransport):
        transport.publisher().delete(exchange_key(transport, exchange))
    elif isinstance(transport, KombuTransport):
        with transport.connection() as conn:
            conn.default_channel.exchange_delete(exchange)


def measure(kind: str, n: int) -> dict[str, Any]:
    """Return the emit and consume rates of plain events and of a stream on broker ``kind``."""
    run = uuid.uuid4().hex[:8]
    app = _app(URLS[kind], run)
    stream = f"bench-{run}"
    plain_q, stream_q = f"bench-{run}-plain", f"bench-{run}-stream"

    @app.on("bench.*", queue=plain_q)
    def plain(event: Any) -> None: ...

    @app.on("bench.*", stream=stream, start="first", queue=stream_q)
    def streamed(event: Any) -> None: ...

    try:
        app.declare_events()
        app.emit("bench.warm", {}, stream=stream)  # declarations and connections out of the way
        app.emit("bench.warm", {})
        t0 = time.perf_counter()
        for i in range(n):
            app.emit("bench.x", {"i": i})
        plain_emit = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            app.emit("bench.x", {"i": i}, stream=stream)
        stream_emit = n / (time.perf_counter() - t0)
        plain_consume = (n + 1) / _consume(app, n + 1, plain_q)
        stream_consume = (n + 1) / _consume(app, n + 1, stream_q)
    finally:
        app.transport.streams().delete(app.streams[stream], [stream_q])
        queues = [plain_q, stream_q]
        app.transport.delete([app.queue(q) for q in queues + [q + DLQ_SUFFIX for q in queues]])
        _delete_exchange(app)
        app.close()
    return {
        "broker": kind,
        "n": n,
        "emit_per_s": {"plain": round(plain_emit), "stream": round(stream_emit)},
        "emit_ratio": round(stream_emit / plain_emit, 2),
        "consume_per_s": {"plain": round(plain_consume), "stream": round(stream_consume)},
        "consume_ratio": round(stream_consume / plain_consume, 2),
    }


def main() -> None:
    """Run the measurements and print one JSON object per broker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="amqp,redis")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per broker; medians printed")
    args = parser.parse_args()
    configure_logging("warning", "console")
    for kind in args.brokers.split(","):
        rounds = [measure(kind, args.n) for _ in range(args.rounds)]
        for found in rounds:
            print(json.dumps(found), flush=True)
        medians = {
            key: statistics.median(r[key] for r in rounds)
            for key in ("emit_ratio", "consume_ratio")
        }
        print(json.dumps({"broker": kind, "median": medians}), flush=True)


if __name__ == "__main__":
    main()
