"""The mqtasks side of ``benchmarks.execution``: no-op tasks, sync and ``async def``, with
time limits and without, on one queue.

The worker runs it with ``python -m mqtasks worker -A benchmarks.bench_execution_app``
(the suite's command line); the broker, queue and key prefix come from the environment
(``BENCH_BROKER_URL``, ``BENCH_QUEUE``, ``BENCH_KEYPREFIX``), as for
``benchmarks.bench_mqtasks_app``. Every task body is the suite's: ``record(seq, sent)``.

* ``bench.noop``: a plain function;
* ``bench.anoop``: an ``async def`` coroutine task;
* ``bench.noop_limited`` and ``bench.anoop_limited``: the same two with
  ``soft_time_limit=25, time_limit=30``, limits that a no-op never reaches: what is
  measured is the cost of watching them.

The coroutine tasks are registered only where mqtasks accepts ``async def`` tasks (an
mqtasks without them refuses the decoration): :data:`ASYNC` says whether it did.
"""

from __future__ import annotations

import os
from typing import Any

from mqtasks import App, Task
from mqtasks.exceptions import ConfigurationError

from ._record import record

#: Task names by variant: (coroutine?, time limits?) -> name.
VARIANTS = {
    "sync": "bench.noop",
    "async": "bench.anoop",
    "sync-limits": "bench.noop_limited",
    "async-limits": "bench.anoop_limited",
}
#: The limits of the ``*-limits`` variants: far above a no-op's run, so never reached.
LIMITS = {"soft_time_limit": 25.0, "time_limit": 30.0}


def make_app(url: str, queue: str, *, keyprefix: str = "") -> tuple[App, dict[str, Task[Any, Any]]]:
    """Return an app on ``queue`` and its no-op tasks by variant (see :data:`VARIANTS`).

    The coroutine variants are missing where mqtasks refuses ``async def`` tasks.
    """
    options: dict[str, Any] = {}
    if keyprefix and url.startswith("redis"):
        options["key_prefix"] = keyprefix.rstrip(":")  # mqtasks' own Redis transport
    app = App("bench", broker=url, default_queue=queue, transport_options=options)
    tasks: dict[str, Task[Any, Any]] = {}

    def noop(seq: int, sent: float) -> None:
        record(seq, sent)

    async def anoop(seq: int, sent: float) -> None:
        record(seq, sent)

    for variant, name in VARIANTS.items():
        fn: Any = anoop if variant.startswith("async") else noop
        limits = LIMITS if variant.endswith("limits") else {}
        try:
            tasks[variant] = app.task(name=name, **limits)(fn)
        except ConfigurationError:
            if not variant.startswith("async"):
                raise
    return app, tasks


app, tasks = make_app(
    os.environ.get("BENCH_BROKER_URL", "memory://"),
    os.environ.get("BENCH_QUEUE", "bench"),
    keyprefix=os.environ.get("BENCH_KEYPREFIX", ""),
)
#: Whether this mqtasks runs ``async def`` tasks (the coroutine variants exist).
ASYNC = "async" in tasks
