"""The app ``tests/test_status.py`` points ``mqtasks status`` at.

``-A tests.status_app:create()`` builds it from the environment, as a separate
process would (a CLI run, a subprocess):

- ``MQTASKS_BROKER_URL``: the broker (read by :class:`mqtasks.config.Settings`).
- ``STATUS_TEST_QUEUE``: the queue of its task :data:`NOOP`.

``-A tests.status_app:current()`` returns the app the test process built last
(a ``memory://`` broker lives in its process only).
"""

from __future__ import annotations

import os

from mqtasks import App

#: Name of the app's one task.
NOOP = "status.noop"
#: Apps built by :func:`create`, latest last.
BUILT: list[App] = []


def create(broker: str | None = None, queue: str | None = None) -> App:
    """Build the test app: one task, :data:`NOOP`, on ``queue``."""
    app = App(
        "status_test",
        broker=broker,
        default_queue=queue or os.environ.get("STATUS_TEST_QUEUE") or "mqt-status-test",
        publish_timeout=5.0,
    )

    @app.task(name=NOOP)
    def noop(n: int) -> None:
        del n

    BUILT.append(app)
    return app


def current() -> App:
    """Return the app :func:`create` built last in this process."""
    return BUILT[-1]
