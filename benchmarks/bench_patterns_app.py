"""The apps of ``benchmarks.patterns``: events against a task, and ordered tasks.

Two apps, built by functions so that every round gets queues, an exchange and keys of
its own:

* :func:`make_emit_app`: three subscribers of ``bench.x`` (three queues) and one task
  ``bench.one`` on a fourth queue, events going to an exchange of the run's own. No
  worker runs them: the benchmark measures publishing.
* :func:`make_keyed_app`: one no-op task ``bench.keyed(key, seq, sent)``, which records
  its start (``benchmarks/_record.py``), either ordered by ``key``
  (``ordering_key="key"``) or plain, on a queue of its own, with a result backend (an
  ordered task needs one; both store no result, ``ignore_result=True``).

The worker runs the keyed app with the suite's command line and two processes
(``python -m mqtasks worker -A benchmarks.bench_patterns_app -c 8 -p 2``), set up from
the environment (set by ``benchmarks.patterns``): ``BENCH_BROKER_URL``, ``BENCH_QUEUE``,
``BENCH_KEYPREFIX`` (the Redis transport's key prefix), ``BENCH_BACKEND_URL``,
``BENCH_BACKEND_PREFIX``, ``BENCH_RECORD_DIR``, ``BENCH_ORDERED`` (``1``: ordered) and
``BENCH_PARTITIONS``. Everything else is mqtasks' defaults (quorum queues, acks after the
task, publisher confirms on).
"""

from __future__ import annotations

import os
from typing import Any

from mqtasks import App, Task

from ._record import record

#: The event every subscriber of the emit app matches.
EVENT = "bench.x"
#: Subscribers of :data:`EVENT` in the emit app, each with a queue of its own.
SUBSCRIBERS = 3


def _transport_options(url: str, keyprefix: str) -> dict[str, Any]:
    if keyprefix and url.startswith("redis") and not url.startswith("redis+kombu"):
        return {"key_prefix": keyprefix.rstrip(":")}  # mqtasks' own Redis transport
    return {}


def emit_queues(prefix: str) -> tuple[list[str], str]:
    """The subscriber queues and the task queue of the emit app with ``prefix``."""
    return [f"{prefix}-sub{i}" for i in range(SUBSCRIBERS)], f"{prefix}-one"


def make_emit_app(
    url: str, prefix: str, *, exchange: str, keyprefix: str = ""
) -> tuple[App, Task[Any, Any]]:
    """Return an app with :data:`SUBSCRIBERS` subscribers of :data:`EVENT`, and its task.

    The subscribers' queues and the task's are named by :func:`emit_queues`; events go
    to ``exchange``.
    """
    subscriber_queues, task_queue = emit_queues(prefix)
    app = App(
        "bench",
        broker=url,
        default_queue=task_queue,
        events_exchange=exchange,
        transport_options=_transport_options(url, keyprefix),
    )
    for i, queue in enumerate(subscriber_queues):

        def subscriber(payload: Any) -> None:
            """A subscriber that does nothing (no worker runs it here)."""

        subscriber.__name__ = subscriber.__qualname__ = f"sub{i}"
        app.on(EVENT, queue=queue, name=f"bench.sub{i}")(subscriber)

    @app.task(name="bench.one")
    def one(payload: Any) -> None:
        """The one-queue task set against the event."""

    return app, one


def make_keyed_app(
    url: str,
    queue: str,
    *,
    ordered: bool,
    backend_url: str,
    backend_prefix: str = "",
    keyprefix: str = "",
    partitions: int = 16,
) -> tuple[App, Task[Any, Any]]:
    """Return an app with the no-op ``bench.keyed(key, seq, sent)`` on ``queue``.

    With ``ordered``, the task is ordered by ``key`` over ``partitions`` partitions.
    """
    extra: dict[str, Any] = {}
    if backend_url:
        extra["backend"] = backend_url
        if backend_prefix:
            extra["backend_key_prefix"] = backend_prefix
    app = App(
        "bench",
        broker=url,
        default_queue=queue,
        transport_options=_transport_options(url, keyprefix),
        **extra,
    )
    options: dict[str, Any] = {"ignore_result": True}
    if ordered:
        options.update(ordering_key="key", partitions=partitions)

    @app.task(name="bench.keyed", **options)
    def keyed(key: int, seq: int, sent: float) -> None:
        record(seq, sent)

    return app, keyed


_env = os.environ
app, keyed = make_keyed_app(
    _env.get("BENCH_BROKER_URL", "memory://"),
    _env.get("BENCH_QUEUE", "bench"),
    ordered=_env.get("BENCH_ORDERED", "0") == "1",
    backend_url=_env.get("BENCH_BACKEND_URL", ""),
    backend_prefix=_env.get("BENCH_BACKEND_PREFIX", ""),
    keyprefix=_env.get("BENCH_KEYPREFIX", ""),
    partitions=int(_env.get("BENCH_PARTITIONS", "16")),
)
