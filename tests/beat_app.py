"""The app ``tests/test_beat_cli.py`` runs ``mqtasks beat`` and ``mqtasks worker --beat`` on.

Broker, backend, app name and queue come from the environment the test sets,
so that each run has names of its own on the shared Redis; each run of the
task pushes its task id onto a Redis list the test reads.
"""

from __future__ import annotations

import os

import redis

from mqtasks import App, current_message

_ENV = os.environ.get

app = App(
    _ENV("BEAT_APP_NAME", "beat"),
    broker=_ENV("BEAT_BROKER_URL", "redis://127.0.0.1:6379/0"),
    # "none": no backend (the test of the refusal)
    backend=None if _ENV("BEAT_BACKEND_URL") == "none" else _ENV("BEAT_BACKEND_URL"),
    default_queue=_ENV("BEAT_QUEUE", "mqt-beat"),
)
_RUNS = _ENV("BEAT_RUNS_KEY", "mqt-beat-runs")
_redis = redis.Redis.from_url(_ENV("BEAT_RUNS_URL") or _ENV("BEAT_BROKER_URL", ""))


@app.periodic(every=1, catch_up="all", name=_ENV("BEAT_APP_NAME", "heartbeat"))
def heartbeat() -> None:
    """Record this tick's task id."""
    message = current_message()
    assert message is not None
    _redis.rpush(_RUNS, message.id)
