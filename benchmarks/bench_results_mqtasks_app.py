"""The mqtasks side of ``benchmarks.results``: the suite's app with a Redis result backend.

The worker runs it with the suite's command line (``python -m mqtasks worker -A
benchmarks.bench_results_mqtasks_app -c 8``). Environment (set by ``benchmarks.results``):

* ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_KEYPREFIX`` (the Redis transport's key
  prefix, as in ``bench_mqtasks_app``), ``BENCH_RECORD_DIR`` (for ``bench.rnoop``);
* ``BENCH_BACKEND_URL``: the result backend (``redis://127.0.0.1:6379/11``); empty: an app
  without a backend, which stores no result; ``BENCH_BACKEND_PREFIX``: the backend's key
  prefix (``backend_key_prefix``), the run's own;
* ``BENCH_CLASSIC`` = ``1``: on RabbitMQ, a classic queue and no publisher confirms, as
  Celery and Dramatiq have by default (for the round trip only: where the time goes).

Everything else is mqtasks' defaults (quorum queues, acks after the task, confirms on).

Tasks: ``bench.value(x) -> x`` (round trips, chord members), ``bench.tally(values) ->
len(values)`` (chord callback), ``bench.rnoop(seq, sent) -> seq``, which records its start
like the suite's no-op (``benchmarks/_record.py``) and returns a small value, and
``bench.rnoop_ignored``, the same with ``ignore_result=True`` (with a backend only).
"""

from __future__ import annotations

import os
from typing import Any

from mqtasks import App

from ._record import add_result_tasks, record, results_app_env


def make_app(
    url: str,
    queue: str,
    *,
    backend_url: str = "",
    backend_prefix: str = "",
    keyprefix: str = "",
    classic: bool = False,
) -> App:
    """Return the app of the benchmark tasks on ``queue``; results in ``backend_url`` if given."""
    options: dict[str, Any] = {}
    if keyprefix and url.startswith("redis+kombu"):
        options["global_keyprefix"] = keyprefix
    elif keyprefix and url.startswith("redis"):
        options["key_prefix"] = keyprefix.rstrip(":")  # mqtasks' own Redis transport
    extra: dict[str, Any] = {}
    if classic and url.startswith("amqp"):
        options["confirm_publish"] = False
        extra["queue_type"] = "classic"
    if backend_url:
        extra["backend"] = backend_url
        if backend_prefix:
            extra["backend_key_prefix"] = backend_prefix
    app = App("bench", broker=url, default_queue=queue, transport_options=options, **extra)

    add_result_tasks(app)

    if backend_url:

        @app.task(name="bench.rnoop_ignored", ignore_result=True)
        def rnoop_ignored(seq: int, sent: float) -> int:
            record(seq, sent)
            return seq

    return app


app = make_app(
    **results_app_env("", ""),
    classic=os.environ.get("BENCH_CLASSIC", "0") == "1",
)
