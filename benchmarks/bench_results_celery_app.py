"""The Celery side of ``benchmarks.results``: the suite's Celery app with its Redis result backend.

The worker runs it with the suite's command line (``celery -A
benchmarks.bench_results_celery_app worker -P prefork -c 2 -O fair --without-gossip
--without-mingle --without-heartbeat -Q <queue>``). The settings are those of
``bench_celery_app`` (acks late, JSON, no events, no remote control), with results on:

* ``result_backend``: ``BENCH_BACKEND_URL`` (a Redis database of the local server);
* ``result_backend_transport_options={"global_keyprefix": BENCH_BACKEND_PREFIX}``, so
  that every result and chord key of the run starts with the run's prefix;
* ``task_ignore_result = False`` (Celery's default), results as JSON.

Environment (set by ``benchmarks.results``): ``BENCH_BROKER_URL``, ``BENCH_QUEUE``,
``BENCH_KEYPREFIX``, ``BENCH_PREFETCH_MULTIPLIER``, ``BENCH_BACKEND_URL``,
``BENCH_BACKEND_PREFIX`` and ``BENCH_RECORD_DIR`` (for ``bench.rnoop``).

Tasks: ``bench.value(x) -> x`` (round trips, chord members), ``bench.tally(values) ->
len(values)`` (chord callback) and ``bench.rnoop(seq, sent) -> seq``, which records its
start like the suite's no-op (``benchmarks/_record.py``) and returns a small value.
"""

from __future__ import annotations

import os

from celery import Celery

from ._record import add_result_tasks, results_app_env
from .bench_celery_app import make_app as make_plain_app


def make_app(
    url: str,
    queue: str,
    *,
    backend_url: str,
    backend_prefix: str,
    keyprefix: str = "",
    prefetch_multiplier: int = 8,
) -> Celery:
    """Return the suite's Celery app for ``queue`` with results stored in ``backend_url``."""
    app = make_plain_app(url, queue, keyprefix=keyprefix, prefetch_multiplier=prefetch_multiplier)
    app.conf.update(
        task_ignore_result=False,
        result_backend=backend_url,
        result_backend_transport_options={"global_keyprefix": backend_prefix},
        result_serializer="json",
        result_accept_content=["json"],
        result_expires=3600,
    )

    add_result_tasks(app)

    return app


app = make_app(
    **results_app_env("cache+memory://", "bench-results:"),
    prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "8")),
)
