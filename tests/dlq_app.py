"""The app ``tests/test_dlq.py`` runs the ``mqtasks dlq`` commands against (in process).

Configured from the environment, so each test points the commands at its own queue:

- ``MQTASKS_BROKER_URL``: the broker (read by :class:`mqtasks.config.Settings`).
- ``DLQ_TEST_QUEUE``: the queue of the task :data:`FLAKY`.

``-A tests.dlq_app:create()`` builds a fresh app per command; the test process
builds the same app with :func:`create` (so task names match) and runs its worker.
"""

from __future__ import annotations

import os

from mqtasks import App

#: Name of the task that fails until :data:`FIXED` says otherwise.
FLAKY = "dlq.flaky"
#: Flip ``FIXED["flaky"]`` to make :data:`FLAKY` succeed (the "fix" before a replay).
FIXED = {"flaky": False}
#: Arguments :data:`FLAKY` ran with successfully, in order.
RAN: list[int] = []


def create(broker: str | None = None, queue: str | None = None) -> App:
    """Build the test app: one task, :data:`FLAKY`, never retried, on ``queue``."""
    app = App(
        "dlq_test",
        broker=broker,
        default_queue=queue or os.environ.get("DLQ_TEST_QUEUE") or "mqt-dlq-test",
        publish_timeout=5.0,
    )

    @app.task(name=FLAKY, max_retries=0)
    def flaky(n: int) -> None:
        if not FIXED["flaky"]:
            raise RuntimeError(f"flaky {n} is broken")
        RAN.append(n)

    return app
