"""The Celery side of ``benchmarks.suite``: the same no-op task, Celery's best settings.

The worker runs it with its own CLI, for example::

    celery -A benchmarks.bench_celery_app worker -P prefork -c 2 -O fair \\
        --without-gossip --without-mingle --without-heartbeat -Q <queue>

Environment (set by the suite): ``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_KEYPREFIX``
(Redis ``global_keyprefix``) and ``BENCH_PREFETCH_MULTIPLIER``.

Settings, chosen for throughput without giving up at-least-once:

* ``task_acks_late = True``: acked after the task, like mqtasks and Dramatiq (Celery's
  default acks before running the task);
* ``task_reject_on_worker_lost = False`` (the default);
* ``worker_prefetch_multiplier``: the suite sets it so that the worker holds 16 unacked
  messages in all (8 x 2 processes, 16 x solo), as mqtasks (2 x 8 threads) and Dramatiq (2 x
  8 threads per process) do; Celery's docs advise a high multiplier for many short tasks;
* no result backend (``task_ignore_result``), no events, no remote control (its pidbox
  queue and fanout exchange), JSON only;
* classic durable queues on RabbitMQ (Celery's default; mqtasks uses quorum queues).
"""

from __future__ import annotations

import os

from celery import Celery

from ._record import record


def make_app(url: str, queue: str, *, keyprefix: str = "", prefetch_multiplier: int = 4) -> Celery:
    app = Celery("bench", broker=url, set_as_current=False)
    transport_options = {}
    if keyprefix and url.startswith("redis"):
        transport_options["global_keyprefix"] = keyprefix
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=prefetch_multiplier,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_detect_quorum_queues=False,
    )

    @app.task(name="bench.noop")
    def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "memory://"),
    os.environ.get("BENCH_QUEUE", "bench"),
    keyprefix=os.environ.get("BENCH_KEYPREFIX", ""),
    prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "4")),
)
noop = app.tasks["bench.noop"]
