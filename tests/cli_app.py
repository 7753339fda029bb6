"""The app ``tests/test_cli.py`` runs with ``python -m mqtasks worker -A tests.cli_app``.

Configured from the environment, so each test gives its worker a queue of its own:

- ``MQTASKS_BROKER_URL``: the broker (read by :class:`mqtasks.config.Settings`).
- ``CLI_TEST_QUEUE``: the queue the tasks publish to and the worker consumes.
- ``CLI_TEST_RECORD``: a file that gets one line per task start and finish,
  ``start|finish <tag> <pid> <time>``, written with ``O_APPEND`` so that the
  test process (and several worker processes) can share it.
- ``CLI_TEST_TRANSPORT_OPTIONS``: transport options as a JSON object (for ``redis://``,
  the test's own ``key_prefix``).
- ``CLI_TEST_LIVENESS_TTL``: shorthand for the ``redis://`` transport's ``liveness_ttl``
  (seconds a consumer that stopped beating keeps its in-flight messages), with a
  ``sweep_interval`` of a quarter of it unless the options give one: how soon the
  messages of a SIGKILLed worker go back to the queue.

The test process builds the same app with :func:`make_app`, so task names match.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from mqtasks import App

#: Name of the task that records its start, sleeps, then records its finish.
WORK = "cli.work"
#: Name of a task without arguments that only records that it ran.
PING = "cli.ping"
#: Environment variable naming the record file.
RECORD_ENV = "CLI_TEST_RECORD"


def record(event: str, tag: str) -> None:
    """Append ``event tag pid time`` to the record file (one ``write``, unbuffered)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = f"{event} {tag} {os.getpid()} {time.time():.3f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def transport_options_from_env() -> dict[str, Any]:
    """Return the transport options the environment asks for."""
    options: dict[str, Any] = json.loads(os.environ.get("CLI_TEST_TRANSPORT_OPTIONS") or "{}")
    liveness = os.environ.get("CLI_TEST_LIVENESS_TTL")
    if liveness:
        options["liveness_ttl"] = float(liveness)
        options.setdefault("sweep_interval", float(liveness) / 4)
    return options


def make_app(
    broker: str | None = None,
    queue: str | None = None,
    transport_options: Mapping[str, Any] | None = None,
) -> App:
    """Build the test app: one task, :data:`WORK`, on ``queue``."""
    app = App(
        "cli_test",
        broker=broker,
        default_queue=queue or os.environ.get("CLI_TEST_QUEUE") or "mqt-cli-test",
        publish_timeout=5.0,
        transport_options=dict(transport_options or {}),
    )

    @app.task(name=WORK)
    def work(tag: str, seconds: float = 0.0) -> None:
        record("start", tag)
        if seconds:
            time.sleep(seconds)
        record("finish", tag)

    @app.task(name=PING)
    def ping() -> None:
        record("ping", "-")

    return app


if os.environ.get("CLI_TEST_THREAD"):
    # A thread running when the app is loaded: a supervisor must not fork then.
    threading.Thread(target=threading.Event().wait, name="cli-test-thread", daemon=True).start()

#: The app the worker subprocess loads.
app = make_app(transport_options=transport_options_from_env())

#: Not an App: ``-A tests.cli_app:NOT_AN_APP`` must be refused.
NOT_AN_APP = "just a string"
#: A task, not an App: ``-A tests.cli_app:ping`` must be refused without running it.
ping = app.tasks[PING]
