"""The Dramatiq side of ``benchmarks.results``: the suite's broker with the Results middleware.

The worker runs it with the suite's command line (``dramatiq
benchmarks.bench_results_dramatiq_app -p 2 -t 8 -Q <queue>``). The broker is made as in
``bench_dramatiq_app`` (``RabbitmqBroker`` or ``RedisBroker``, default middleware), plus ``dramatiq.results.Results`` on its ``RedisBackend`` in
``BENCH_BACKEND_URL``, with ``namespace=BENCH_BACKEND_PREFIX`` and
``use_namespace_prefix_keys=True``, so that every result key of the run starts with the
run's prefix. The actor ``bench_value(x) -> x`` stores its result (``store_results=True``);
``bench_rnoop(seq, sent)`` records its start (``benchmarks/_record.py``) and stores nothing
(it tells when the worker has started).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from ._record import record


def make_results_broker(
    url: str, queue: str, *, backend_url: str, backend_prefix: str, keyprefix: str = ""
) -> tuple[Any, Any, Any, RedisBackend]:
    """Return ``(broker, value actor, rnoop actor, result backend)``.

    The broker becomes dramatiq's global broker.
    """
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
    backend = RedisBackend(
        url=backend_url,
        namespace=backend_prefix.rstrip(":"),
        use_namespace_prefix_keys=True,
    )
    broker.add_middleware(Results(backend=backend))

    def bench_value(x: Any) -> Any:
        return x

    actor = dramatiq.actor(
        actor_name="bench_value", queue_name=queue, broker=broker, store_results=True
    )(bench_value)

    def bench_rnoop(seq: int, sent: float) -> None:
        record(seq, sent)

    rnoop = dramatiq.actor(actor_name="bench_rnoop", queue_name=queue, broker=broker)(bench_rnoop)
    return broker, actor, rnoop, backend


broker, value, rnoop, backend = (
    make_results_broker(
        os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"),
        os.environ["BENCH_QUEUE"],
        backend_url=os.environ.get("BENCH_BACKEND_URL", "redis://127.0.0.1:6379/11"),
        backend_prefix=os.environ.get("BENCH_BACKEND_PREFIX", "bench-results"),
        keyprefix=os.environ.get("BENCH_KEYPREFIX", ""),
    )
    if os.environ.get("BENCH_QUEUE")
    else (None, None, None, None)
)
