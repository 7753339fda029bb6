"""The mqtasks side of ``benchmarks.suite``: one no-op task on one queue.

The worker runs it with ``python -m mqtasks worker -A benchmarks.bench_mqtasks_app -c 8``;
the broker and queue come from the environment (set by the suite):

* ``BENCH_BROKER_URL``, ``BENCH_QUEUE``;
* ``BENCH_CONFIRM`` = ``0`` turns RabbitMQ publisher confirms off (only the publishing
  side cares; the worker does not publish);
* ``BENCH_OBSERVE`` = ``1``: observability all on (``benchmarks/_observe.py``): spans
  through the OpenTelemetry SDK with a batch span processor, the structlog context, and
  StatsD metrics to ``BENCH_STATSD_URL``; the worker's own command line sets JSON logs;
* ``BENCH_KEYPREFIX``: on Redis, the transport's key prefix (``key_prefix`` of mqtasks'
  ``redis://``, kombu's ``global_keyprefix`` on ``redis+kombu://``), so that every key
  of the run carries the run's prefix and is swept at the end.

Everything else is mqtasks' defaults: quorum queues, acks after the task, confirms on.
"""

from __future__ import annotations

import os
from typing import Any

from mqtasks import App, Task

from ._record import record


def make_app(
    url: str,
    queue: str,
    *,
    confirm: bool = True,
    keyprefix: str = "",
    observe: bool = False,
    statsd_url: str = "",
) -> tuple[App, Task[Any, Any]]:
    """Return an app with the benchmark task ``bench.noop(seq, sent)`` on ``queue``.

    With ``observe``, the middleware records every span (an SDK tracer provider of the
    app's own), binds the log context and sends StatsD metrics to ``statsd_url``;
    otherwise the app has mqtasks' default middleware.
    """
    extra: dict[str, Any] = {}
    if observe:
        from ._observe import observed_middleware, tracer_provider

        provider, _ = tracer_provider()
        extra["middleware"] = observed_middleware(provider, statsd_url or None)
    options: dict[str, Any] = {}
    if not confirm:
        options["confirm_publish"] = False
    if keyprefix and url.startswith("redis+kombu"):
        options["global_keyprefix"] = keyprefix
    elif keyprefix and url.startswith("redis"):
        options["key_prefix"] = keyprefix.rstrip(":")  # mqtasks' own Redis transport
    app = App("bench", broker=url, default_queue=queue, transport_options=options, **extra)

    @app.task(name="bench.noop")
    def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    return app, noop


app, noop = make_app(
    os.environ.get("BENCH_BROKER_URL", "memory://"),
    os.environ.get("BENCH_QUEUE", "bench"),
    confirm=os.environ.get("BENCH_CONFIRM", "1") != "0",
    keyprefix=os.environ.get("BENCH_KEYPREFIX", ""),
    observe=os.environ.get("BENCH_OBSERVE", "0") == "1",
    statsd_url=os.environ.get("BENCH_STATSD_URL", ""),
)
