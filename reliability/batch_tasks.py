"""The batch scenario's app (S21): one batch task whose items are task ids, one in a
hundred failing on purpose.

Workers run it as ``python -m mqtasks worker -A reliability.batch_tasks``; it
reads the environment :mod:`reliability.tasks` reads. The ledger is written by
:class:`~reliability.tasks.LedgerMiddleware`, per message: ``start`` when the
message's batch starts, ``done`` when its item succeeded, so a failed item has a
``start`` and no ``done``.

:data:`BATCH` takes one item per message, the message's task id; an id ending in
:data:`BAD_SUFFIX` fails (listed in :exc:`~mqtasks.BatchFailures`), is retried
once, alone, and fails again: dead-lettered as ``max_retries_exceeded`` after 2
attempts. The function sleeps :data:`ITEM_MS` per item, so that a SIGKILL can
land while a batch runs.
"""

from __future__ import annotations

import os
import time

from mqtasks import App, BatchFailures

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .tasks import LedgerMiddleware

__all__ = ["BAD_SUFFIX", "BATCH", "BATCH_SIZE", "BATCH_WAIT", "ITEM_MS", "build_batch_app"]

#: The batch task's name.
BATCH = "rel.batch"
#: Items per batch, and seconds a partial batch waits for more.
BATCH_SIZE = 100
BATCH_WAIT = 0.5
#: Milliseconds of work per item.
ITEM_MS = 0.5
#: The task ids that fail on purpose end with this.
BAD_SUFFIX = "-bad"


def build_batch_app(environ: dict[str, str] | None = None) -> App:
    """Build the batch scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    rel = App(
        "reliability-batches",
        queues=[queue_spec(env, run_queue(env))],
        middleware=[LedgerMiddleware(env.get("RELIABILITY_LEDGER_DIR"))],
        **app_options(env),
    )

    @rel.task(
        name=BATCH, batch_size=BATCH_SIZE, batch_wait=BATCH_WAIT, max_retries=1, retry_backoff=0
    )
    def batch(ids: list[str]) -> None:
        """Work on each item; the ids ending in :data:`BAD_SUFFIX` fail."""
        time.sleep(len(ids) * ITEM_MS / 1000.0)
        failed = {
            i: ValueError(f"item {x} fails on purpose")
            for i, x in enumerate(ids)
            if x.endswith(BAD_SUFFIX)
        }
        if failed:
            raise BatchFailures(failed)

    return rel


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_batch_app)
