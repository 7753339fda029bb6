"""The chord scenario's app: member and callback tasks, and a result backend.

Workers run it as ``python -m mqtasks worker -A reliability.workflow_tasks``;
it reads the environment :mod:`reliability.tasks` reads, plus:

* ``MQTASKS_BACKEND_URL``: the result backend (Redis or PostgreSQL);
* ``MQTASKS_BACKEND_KEY_PREFIX``: what the backend puts in front of its keys.

The tasks write the ledger from their bodies, under logical keys passed as
arguments: a chord's key, and ``<chord key>.m<index>`` for its members. The
worker may skip a callback copy before the task runs (its outcome is stored
already, or another copy holds the run lease); a middleware in front of that
check would count such a skip as a start, the body counts only what really ran.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from mqtasks import App, current_message
from mqtasks.transport import QueueSpec

from .ledger import LedgerWriter
from .tasks import DEFAULT_QUEUE

__all__ = [
    "CALLBACK",
    "MEMBER",
    "build_workflow_app",
    "ledger_key",
    "member_key",
]

#: Task names.
MEMBER = "rel.chord_member"
CALLBACK = "rel.chord_callback"


def member_key(chord_key: str, index: int) -> str:
    """The ledger key of member ``index`` of the chord ``chord_key``."""
    return f"{chord_key}.m{index}"


def ledger_key(task: str | None, args: Sequence[Any]) -> str | None:
    """The ledger key in a message's arguments (a dead letter's), or None if it has none.

    Members take ``(key, value, ms)``; the callback takes ``(values, key, ms)``,
    its members' values put in front of the arguments it was given.
    """
    at = 1 if task == CALLBACK else 0
    key = args[at] if len(args) > at else None
    return key if isinstance(key, str) else None


class _Ledger:
    """This process's ledger file (one per pid, opened on first use)."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._writer: LedgerWriter | None = None
        self._pid = 0

    def record(self, kind: str, key: str, **info: Any) -> None:
        if self.directory is None:
            return
        if self._writer is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._writer = LedgerWriter(os.path.join(self.directory, f"worker-{self._pid}.jsonl"))
        msg = current_message()
        self._writer.record(
            kind,  # type: ignore[arg-type]
            key,
            attempt=msg.attempt if msg is not None else None,
            message_id=msg.id if msg is not None else None,
            **info,
        )


def build_workflow_app(environ: dict[str, str] | None = None) -> App:
    """Build the chord scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    queue = env.get("RELIABILITY_QUEUE") or DEFAULT_QUEUE
    limit = env.get("RELIABILITY_DELIVERY_LIMIT")
    options = json.loads(env.get("RELIABILITY_TRANSPORT_OPTIONS") or "{}")
    spec = QueueSpec(queue, delivery_limit=int(limit) if limit else None)
    backend: dict[str, Any] = {"backend": env.get("MQTASKS_BACKEND_URL")}
    if env.get("MQTASKS_BACKEND_KEY_PREFIX"):
        backend["backend_key_prefix"] = env["MQTASKS_BACKEND_KEY_PREFIX"]
    rel = App(
        "reliability-workflows",
        broker=env.get("MQTASKS_BROKER_URL"),
        queue_type=env.get("MQTASKS_QUEUE_TYPE"),
        publish_timeout=float(env.get("MQTASKS_PUBLISH_TIMEOUT") or 10.0),
        heartbeat=float(env.get("MQTASKS_HEARTBEAT") or 10.0),
        default_queue=queue,
        queues=[spec],
        middleware=[],
        transport_options=options,
        **backend,
    )
    _register(rel, _Ledger(env.get("RELIABILITY_LEDGER_DIR")))
    return rel


def _register(rel: App, ledger: _Ledger) -> None:
    @rel.task(name=MEMBER)
    def member(key: str, value: int, ms: float) -> int:
        """A chord member: sleep ``ms`` milliseconds, return ``value``."""
        ledger.record("start", key, task=MEMBER)
        if ms > 0:
            time.sleep(ms / 1000.0)
        ledger.record("done", key, task=MEMBER)
        return value

    @rel.task(name=CALLBACK)
    def callback(values: list[int], key: str, ms: float) -> int:
        """A chord callback: sleep ``ms`` milliseconds, return the sum of the members' values.

        The ledger's ``done`` line carries the values as received, so the
        harness checks their order against the header's.
        """
        ledger.record("start", key, task=CALLBACK)
        if ms > 0:
            time.sleep(ms / 1000.0)
        total = sum(values)
        ledger.record("done", key, task=CALLBACK, values=list(values))
        return total


_app: App | None = None


def __getattr__(name: str) -> Any:
    """``app``, the app ``-A reliability.workflow_tasks`` loads: built on first use.

    The harness imports this module for its names (every scenario is imported
    by the registry), so importing it builds nothing.
    """
    global _app
    if name == "app":
        if _app is None:
            _app = build_workflow_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
