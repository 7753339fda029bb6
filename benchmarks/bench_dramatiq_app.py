"""The Dramatiq side of ``benchmarks.suite``: the same no-op task, Dramatiq's defaults.

The worker runs it with ``dramatiq benchmarks.bench_dramatiq_app -p 2 -t 8 -Q <queue>``.
Environment (set by the suite): ``BENCH_BROKER_URL``, ``BENCH_QUEUE`` and, on Redis,
``BENCH_KEYPREFIX`` used as the broker's ``namespace`` (every key of the run starts with
it). ``RabbitmqBroker`` (classic durable queues, its delay and dead-letter queues, no
publisher confirms: its default) or ``RedisBroker`` (its Lua-scripted broker), with the
default middleware; messages are acked after the actor returns.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq

from ._record import record


def make_broker(url: str, queue: str, *, keyprefix: str = "") -> tuple[Any, Any]:
    """Return ``(broker, actor)``; the broker becomes dramatiq's global broker."""
    if url.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker

        broker: Any = RedisBroker(url=url, namespace=(keyprefix or "bench").rstrip(":"))
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # pika reads the vhost from the path: "//" would be the vhost "", not "/".
        if url.endswith("//"):
            url = url[:-2] + "/%2F"
        broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)

    def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    actor = dramatiq.actor(noop, actor_name="bench_noop", queue_name=queue, broker=broker)
    return broker, actor


broker, noop = (
    make_broker(
        os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"),
        os.environ.get("BENCH_QUEUE", "bench"),
        keyprefix=os.environ.get("BENCH_KEYPREFIX", ""),
    )
    if os.environ.get("BENCH_QUEUE")
    else (None, None)
)
