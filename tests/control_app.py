"""The app ``tests/test_control.py`` runs with ``mqtasks worker -A tests.control_app``.

Configured from the environment, so each test has an app and queue of its own:
``MQTASKS_BROKER_URL`` (the broker), ``CONTROL_TEST_APP`` (the app's name, which
scopes its heartbeats and control messages) and ``CONTROL_TEST_QUEUE``.
"""

from __future__ import annotations

import os
import time

from mqtasks import App

#: The task that sleeps for the seconds given.
NAP = "ctl.nap"


def make_app(broker: str | None = None, name: str | None = None, queue: str | None = None) -> App:
    """Build the test app: :data:`NAP` on ``queue``."""
    app = App(
        name or os.environ.get("CONTROL_TEST_APP") or "control_test",
        broker=broker,
        default_queue=queue or os.environ.get("CONTROL_TEST_QUEUE") or "mqt-control-test",
        publish_timeout=5.0,
    )

    @app.task(name=NAP)
    def nap(seconds: float = 0.0) -> None:
        time.sleep(seconds)

    return app


app = make_app()
