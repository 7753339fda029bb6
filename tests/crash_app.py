"""The app that crash and restart tests run as ``python -m mqtasks worker -A tests.crash_app``.

Configured from the environment, so each test gives its worker a queue of its own:

- ``MQTASKS_BROKER_URL``, ``MQTASKS_DELIVERY_LIMIT``, ``MQTASKS_QUEUE_TYPE`` (read by
  :class:`mqtasks.config.Settings`).
- ``CRASH_TEST_QUEUE``: the queue the tasks publish to and the worker consumes.
- ``CRASH_TEST_RECORD``: a file that gets one line per event, ``event tag pid``,
  each written with one ``O_APPEND`` write (shared by the test and every worker).
- ``CRASH_TEST_TRANSPORT_OPTIONS``: transport options as a JSON object (for
  ``redis://``: the test's own ``key_prefix``, a short ``liveness_ttl``).

The test process builds the same app with :func:`make_app`, so task names match.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tenacity

from mqtasks import App, Message, Middleware

#: Task that records ``start <tag>``, then SIGKILLs its own worker process.
KILL = "crash.kill"
#: Task that records ``ping <tag>``.
PING = "crash.ping"
#: Task that fails on its first attempt (retried after :data:`FLAKY_BACKOFF` s), then succeeds.
FLAKY = "crash.flaky"
#: Seconds the broker holds the retry of :data:`FLAKY`.
FLAKY_BACKOFF = 2.0


def record(event: str, tag: str) -> None:
    """Append ``event tag pid`` to the record file (one ``write``, unbuffered)."""
    path = os.environ.get("CRASH_TEST_RECORD")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {tag} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def read_record(path: Path) -> list[tuple[str, str, int]]:
    """The ``(event, tag, pid)`` lines of a record file (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [
        (event, tag, int(pid))
        for event, tag, pid in (line.split() for line in path.read_text().splitlines())
    ]


class AttemptRecorder(Middleware):
    """Records ``attempt<N> <tag>`` before each run (the tag is the first argument)."""

    def before_process(self, worker: Any, message: Message) -> None:
        if message.args:
            record(f"attempt{message.attempt}", str(message.args[0]))


def make_app(
    broker: str | None = None,
    queue: str | None = None,
    transport_options: Mapping[str, Any] | None = None,
    queue_type: str | None = None,
) -> App:
    """Build the test app: :data:`KILL`, :data:`PING` and :data:`FLAKY` on ``queue``
    (of ``queue_type`` on RabbitMQ; the worker reads ``MQTASKS_QUEUE_TYPE``)."""
    overrides: dict[str, Any] = {} if queue_type is None else {"queue_type": queue_type}
    app = App(
        "crash_test",
        broker=broker,
        default_queue=queue or os.environ.get("CRASH_TEST_QUEUE") or "mqt-crash-test",
        publish_timeout=5.0,
        transport_options=dict(transport_options or {}),
        **overrides,
    )
    app.middleware.append(AttemptRecorder())

    @app.task(name=KILL, max_retries=0)
    def kill(tag: str) -> None:
        record("start", tag)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(name=PING)
    def ping(tag: str) -> None:
        record("ping", tag)

    @app.task(name=FLAKY, max_retries=1, retry_backoff=tenacity.wait_fixed(FLAKY_BACKOFF))
    def flaky(tag: str) -> None:
        path = os.environ.get("CRASH_TEST_RECORD")
        first = not any(e == "start" and t == tag for e, t, _ in read_record(Path(path or "-")))
        record("start", tag)
        if first:
            raise RuntimeError(f"{tag}: first attempt fails")
        record("finish", tag)

    return app


#: The app the worker subprocess loads.
app = make_app(transport_options=json.loads(os.environ.get("CRASH_TEST_TRANSPORT_OPTIONS") or "{}"))
