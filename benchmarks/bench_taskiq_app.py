"""taskiq's side of ``benchmarks.execution``: one no-op ``async def`` task on Redis.

The worker runs it with ``taskiq worker benchmarks.bench_taskiq_app:broker --workers 1
--ack-type when_executed``; the environment sets the rest:

* ``BENCH_BROKER_URL``: the Redis URL;
* ``BENCH_QUEUE``: the stream (or list) name, also the consumer group's name;
* ``BENCH_TASKIQ_BROKER``: ``stream`` (default) for taskiq-redis's ``RedisStreamBroker``,
  which acknowledges a message after its task (``XACK``) and claims back those a dead
  worker left; ``list`` for its ``ListQueueBroker`` (``BRPOP``: no acknowledgement, a
  killed worker loses what it took).

The stream's consumer group reads from the stream's start (``consumer_id="0"``), so that
the tasks published before the worker started are delivered. The task body is the suite's
``record(seq, sent)``.
"""

from __future__ import annotations

import os

from taskiq.abc.broker import AsyncBroker
from taskiq_redis import ListQueueBroker, RedisStreamBroker

from ._record import record


def make_broker(url: str, queue: str, kind: str = "stream") -> AsyncBroker:
    """Return a taskiq Redis broker on ``queue`` with the task ``bench.noop(seq, sent)``."""
    broker: AsyncBroker
    if kind == "list":
        broker = ListQueueBroker(url, queue_name=queue)
    else:
        broker = RedisStreamBroker(
            url, queue_name=queue, consumer_group_name=queue, consumer_id="0"
        )

    @broker.task(task_name="bench.noop")
    async def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    return broker


broker = make_broker(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"),
    os.environ.get("BENCH_QUEUE", "bench"),
    os.environ.get("BENCH_TASKIQ_BROKER", "stream"),
)
