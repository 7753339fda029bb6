"""The events scenario's app (S17): three subscriber groups of one event.

Workers run it as ``python -m mqtasks worker -A reliability.event_tasks``; it
reads the environment :mod:`reliability.tasks` reads, plus
``MQTASKS_EVENTS_EXCHANGE``, the run's own events exchange (bindings of other
runs never route into this one's queues).

Every event is named :data:`EVENT`, and its payload is ``{"key": <event key>,
"ms": <duration>}``. Three subscribers, each on a queue of its own
(``<run queue>.g0`` .. ``.g2``), bind patterns that all match it: an exact
name, a ``*`` and a ``#`` pattern. Each writes the ledger from its body under
``<event key>.g<group>``, so one event is three ledger ids, one per group, and
a group that never ran an event shows as that id ``lost``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from mqtasks import App

from .app_env import app_options, lazy_app, queue_spec, run_queue
from .workflow_tasks import _Ledger

__all__ = ["EVENT", "GROUPS", "PATTERNS", "build_events_app", "group_key", "group_queue"]

#: The name every event of the run is emitted under.
EVENT = "rel.order.created"
#: The subscribers' binding patterns, one per group; each matches :data:`EVENT`.
PATTERNS = ("rel.order.created", "rel.order.*", "rel.#")
#: Subscriber groups.
GROUPS = len(PATTERNS)


def group_key(event_key: str, group: int) -> str:
    """The ledger id of group ``group``'s run of the event ``event_key``."""
    return f"{event_key}.g{group}"


def group_queue(queue: str, group: int) -> str:
    """The queue of group ``group``'s subscriber, for the run's queue ``queue``."""
    return f"{queue}.g{group}"


def payload_key(payload: Any) -> str | None:
    """The event key in a payload (a dead letter's), or None if it has none."""
    key = payload.get("key") if isinstance(payload, Mapping) else None
    return key if isinstance(key, str) else None


def build_events_app(environ: dict[str, str] | None = None) -> App:
    """Build the events scenario's app from ``environ`` (``os.environ`` by default)."""
    env = dict(os.environ if environ is None else environ)
    queue = run_queue(env)
    rel = App(
        "reliability-events",
        events_exchange=env.get("MQTASKS_EVENTS_EXCHANGE"),
        queues=[
            queue_spec(env, q) for q in (queue, *(group_queue(queue, g) for g in range(GROUPS)))
        ],
        middleware=[],
        **app_options(env),
    )
    ledger = _Ledger(env.get("RELIABILITY_LEDGER_DIR"))
    for group, pattern in enumerate(PATTERNS):
        rel.on(pattern, queue=group_queue(queue, group), name=f"rel.event.g{group}")(
            _subscriber(ledger, group)
        )
    return rel


def _subscriber(ledger: _Ledger, group: int) -> Callable[[dict[str, Any]], None]:
    def subscriber(payload: dict[str, Any]) -> None:
        """Sleep ``payload["ms"]`` milliseconds between the ledger's start and done."""
        key = group_key(payload["key"], group)
        ledger.record("start", key, group=group)
        ms = float(payload.get("ms") or 0)
        if ms > 0:
            time.sleep(ms / 1000.0)
        ledger.record("done", key, group=group)

    subscriber.__name__ = subscriber.__qualname__ = f"group{group}"
    return subscriber


#: ``app``, the app ``-A`` loads, built on first use.
__getattr__ = lazy_app(__name__, build_events_app)
