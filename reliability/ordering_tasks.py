"""The ordering scenario's app (S18): one task ordered by key, and a result backend.

Workers run it as ``python -m mqtasks worker -A reliability.ordering_tasks``;
it reads the environment :mod:`reliability.tasks` reads, plus
``MQTASKS_BACKEND_URL`` and ``MQTASKS_BACKEND_KEY_PREFIX`` (ordered tasks keep
their sequence numbers and partition leases in the backend).

:data:`ORDERED` takes ``(task_id, key, seq, ms)`` and is ordered by ``key``
over :data:`PARTITIONS` partition queues of the run's queue. Its body writes
the ledger (``start`` and ``done`` under the task id, with the key and the
sequence number the publisher gave it), so the harness can tell, per key,
whether a task started before an earlier one had finished.
"""

from __future__ import annotations

import os
import time

from mqtasks import App

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .workflow_tasks import _Ledger

__all__ = ["ORDERED", "PARTITIONS", "build_ordering_app"]

#: The ordered task's name.
ORDERED = "rel.ordered"
#: Partition queues of the run's queue.
PARTITIONS = 16


def build_ordering_app(environ: dict[str, str] | None = None) -> App:
    """Build the ordering scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    rel = App(
        "reliability-ordering",
        queues=[queue_spec(env, run_queue(env))],
        middleware=None,
        **app_options(env),
    )
    ledger = _Ledger(env.get("RELIABILITY_LEDGER_DIR"))

    @rel.task(name=ORDERED, ordering_key="key", partitions=PARTITIONS, ignore_result=True)
    def ordered(task_id: str, key: str, seq: int, ms: float) -> None:
        """Sleep ``ms`` milliseconds between the ledger's start and done."""
        ledger.record("start", task_id, order_key=key, seq=seq)
        if ms > 0:
            time.sleep(ms / 1000.0)
        ledger.record("done", task_id, order_key=key, seq=seq)

    return rel


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_ordering_app)
