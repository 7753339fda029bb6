"""The time-limit scenario's app (S19): short tasks, and tasks that never end by themselves.

Workers run it as ``python -m mqtasks worker -A reliability.timelimit_tasks``; it
reads the environment :mod:`reliability.tasks` reads. The ledger is written by
:class:`~reliability.tasks.LedgerMiddleware` (``start`` before a task runs,
``done`` after it returned), so a task stopped by its hard limit has a ``start``
and no ``done``.

* :data:`WORK` ``(task_id, ms)``: sleeps ``ms`` milliseconds;
* :data:`SPIN` ``(task_id)``: an endless Python loop, which the asynchronous
  exception of the hard limit can interrupt in a thread;
* :data:`BLOCK` ``(task_id)``: ``time.sleep(3600)``, a blocking C call that
  nothing interrupts in a thread: the worker gives the thread up.

The two hanging tasks have a hard limit of :data:`HARD_LIMIT` seconds and no soft
limit, so that each ends in the dead-letter queue with reason ``time_limit`` at
its first run (a soft limit would count as a failure and be retried first).
"""

from __future__ import annotations

import os
import time

from mqtasks import App

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .tasks import LedgerMiddleware

__all__ = ["BLOCK", "HARD_LIMIT", "SPIN", "WORK", "build_timelimit_app"]

#: Task names.
WORK = "rel.tl.work"
SPIN = "rel.tl.spin"
BLOCK = "rel.tl.block"
#: The hanging tasks' hard time limit, seconds.
HARD_LIMIT = 2.0


def build_timelimit_app(environ: dict[str, str] | None = None) -> App:
    """Build the time-limit scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    rel = App(
        "reliability-timelimits",
        queues=[queue_spec(env, run_queue(env))],
        middleware=[LedgerMiddleware(env.get("RELIABILITY_LEDGER_DIR"))],
        **app_options(env),
    )

    @rel.task(name=WORK)
    def work(task_id: str, ms: float) -> None:
        """Sleep ``ms`` milliseconds."""
        if ms > 0:
            time.sleep(ms / 1000.0)

    @rel.task(name=SPIN, time_limit=HARD_LIMIT)
    def spin(task_id: str) -> None:
        """Loop forever in Python."""
        n = 0
        while True:
            n += 1

    @rel.task(name=BLOCK, time_limit=HARD_LIMIT)
    def block(task_id: str) -> None:
        """Block in C for an hour."""
        time.sleep(3600)

    return rel


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_timelimit_app)
