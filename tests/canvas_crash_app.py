"""The app chord crash tests run as ``python -m mqtasks worker -A tests.canvas_crash_app``.

Configured from the environment, so each test gives its worker a queue and keys of its own:

- ``MQTASKS_BROKER_URL``, ``MQTASKS_BACKEND_URL``, ``MQTASKS_BACKEND_KEY_PREFIX``
  (read by :class:`mqtasks.config.Settings`).
- ``CANVAS_TEST_QUEUE``: the queue the tasks publish to and the worker consumes.
- ``CANVAS_TEST_KEY``: the prefix of the Redis counters the tasks increment
  (``<key>:member:<i>``, ``<key>:callback``), on the local Redis.
- ``CANVAS_TEST_KILL``: where a worker SIGKILLs itself, once (the first worker
  to get there claims ``<key>:killed``): ``member`` in the first member's body,
  ``publish`` right after the broker confirmed the chord's callback, before
  the member that published it is acknowledged.
- ``CANVAS_TEST_TRANSPORT_OPTIONS``: transport options as a JSON object (for
  ``redis://``: a key prefix of the test's own and a short ``liveness_ttl``).

The test process builds the same app with :func:`make_app`, so task names match.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from typing import Any

import redis

from mqtasks import App, Message, Middleware
from mqtasks.middleware.workflow import Workflow

#: A chord member: counts its run, returns its argument.
MEMBER = "canvas_crash.member"
#: The chord's callback: counts its run, returns the sum of the values.
CALLBACK = "canvas_crash.callback"
#: The Redis the counters live in.
REDIS_URL = os.environ.get("MQTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def _counters() -> redis.Redis[bytes]:
    return redis.Redis.from_url(REDIS_URL)


def _die_once(key: str) -> None:
    """SIGKILL this process, unless a process was killed for ``key`` already."""
    if _counters().set(f"{key}:killed", os.getpid(), nx=True):
        os.kill(os.getpid(), signal.SIGKILL)


class KillAfterCallbackPublish(Middleware):
    """Kills the worker once the broker confirmed the chord's callback (``publish``)."""

    def after_publish(self, app: App, message: Message) -> None:
        key = os.environ.get("CANVAS_TEST_KEY", "")
        if message.task == CALLBACK and os.environ.get("CANVAS_TEST_KILL") == "publish":
            _die_once(key)


def make_app(
    broker: str | None = None,
    queue: str | None = None,
    transport_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> App:
    """Build the test app: :data:`MEMBER` and :data:`CALLBACK` on ``queue``."""
    app = App(
        "canvas_crash",
        broker=broker,
        default_queue=queue or os.environ.get("CANVAS_TEST_QUEUE") or "mqt-canvas-crash",
        publish_timeout=5.0,
        transport_options=dict(transport_options or {}),
        **overrides,
    )
    app.middleware.extend([KillAfterCallbackPublish(), Workflow(lease_ttl=2.0, defer_delay=0.2)])

    @app.task(name=MEMBER)
    def member(i: int) -> int:
        key = os.environ.get("CANVAS_TEST_KEY", "")
        _counters().incr(f"{key}:member:{i}")
        if i == 0 and os.environ.get("CANVAS_TEST_KILL") == "member":
            _die_once(key)
        return i

    @app.task(name=CALLBACK)
    def callback(values: list[int]) -> int:
        key = os.environ.get("CANVAS_TEST_KEY", "")
        _counters().incr(f"{key}:callback")
        return sum(values)

    return app


#: The app the worker subprocess loads.
app = make_app(
    transport_options=json.loads(os.environ.get("CANVAS_TEST_TRANSPORT_OPTIONS") or "{}")
)
