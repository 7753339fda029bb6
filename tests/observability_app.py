"""The app ``tests/test_logging.py`` runs with ``python -m mqtasks worker -A tests.observability_app``.

Configured from the environment: ``MQTASKS_BROKER_URL`` (the broker) and
``OBS_TEST_QUEUE`` (the queue). With ``OBS_TEST_TRACING=1`` it also sets the
global OpenTelemetry tracer provider (the SDK's, exporting nowhere), as an
application that traces would; the test process leaves it unset.
"""

from __future__ import annotations

import os

import structlog

from mqtasks import App

#: Task that logs an event of its own, with the task context added by mqtasks.
HELLO = "obs.hello"
#: Task that always fails, and is dead-lettered without a retry.
FAIL = "obs.fail"


def make_app() -> App:
    """The app, on ``MQTASKS_BROKER_URL`` with its tasks on ``OBS_TEST_QUEUE``."""
    app = App("obs", default_queue=os.environ.get("OBS_TEST_QUEUE", "obs"))

    @app.task(name=HELLO)
    def hello(name: str) -> str:
        structlog.get_logger("user").info("user.greeting", greeted=len(name))
        return f"hello {name}"

    @app.task(name=FAIL, max_retries=0)
    def fail() -> None:
        raise RuntimeError("always")

    return app


if os.environ.get("OBS_TEST_TRACING") == "1":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())

app = make_app()
