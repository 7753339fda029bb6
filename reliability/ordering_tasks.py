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

import json
import os
import time
from typing import Any

from mqtasks import App
from mqtasks.transport import QueueSpec

from .tasks import DEFAULT_QUEUE
from .workflow_tasks import _Ledger

__all__ = ["ORDERED", "PARTITIONS", "build_ordering_app"]

#: The ordered task's name.
ORDERED = "rel.ordered"
#: Partition queues of the run's queue.
PARTITIONS = 16


def build_ordering_app(environ: dict[str, str] | None = None) -> App:
    """Build the ordering scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    queue = env.get("RELIABILITY_QUEUE") or DEFAULT_QUEUE
    limit = env.get("RELIABILITY_DELIVERY_LIMIT")
    options = json.loads(env.get("RELIABILITY_TRANSPORT_OPTIONS") or "{}")
    spec = QueueSpec(queue, delivery_limit=int(limit) if limit else None)
    backend: dict[str, Any] = {"backend": env.get("MQTASKS_BACKEND_URL")}
    if env.get("MQTASKS_BACKEND_KEY_PREFIX"):
        backend["backend_key_prefix"] = env["MQTASKS_BACKEND_KEY_PREFIX"]
    rel = App(
        "reliability-ordering",
        broker=env.get("MQTASKS_BROKER_URL"),
        queue_type=env.get("MQTASKS_QUEUE_TYPE"),
        publish_timeout=float(env.get("MQTASKS_PUBLISH_TIMEOUT") or 10.0),
        heartbeat=float(env.get("MQTASKS_HEARTBEAT") or 10.0),
        default_queue=queue,
        queues=[spec],
        middleware=None,
        transport_options=options,
        **backend,
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


_app: App | None = None


def __getattr__(name: str) -> Any:
    """``app``, the app ``-A reliability.ordering_tasks`` loads: built on first use
    (the registry imports this module for its names and builds nothing)."""
    global _app
    if name == "app":
        if _app is None:
            _app = build_ordering_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
