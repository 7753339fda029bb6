"""The brokers tests run on (memory, the local RabbitMQ and Redis, fakeredis), names
no other test run uses, and the cleanup of what a test declared.

The local brokers are shared by every engineer and CI run on the machine: every
queue a test makes is named by :func:`unique_name`, and :func:`cleanup` deletes
only those.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from mqtasks import App
from mqtasks.testing import FAKE_REDIS_URL, reset
from mqtasks.transport.base import DLQ_SUFFIX

__all__ = [
    "AMQP_URL",
    "BROKERS",
    "REDIS_URL",
    "RUN_ID",
    "cleanup",
    "require_broker",
    "unique_name",
]

#: The local RabbitMQ used by integration tests.
AMQP_URL = os.environ.get("MQTASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The local Redis used by integration tests (a database of its own).
REDIS_URL = os.environ.get("MQTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

#: ``fakeredis``: the ``redis://`` transport on an in-process fakeredis server, per app.
BROKERS = {"memory": "memory://", "amqp": AMQP_URL, "redis": REDIS_URL, "fakeredis": FAKE_REDIS_URL}

#: Unique per test run, so runs sharing a broker never see each other's queues.
RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count()


def unique_name(prefix: str = "q") -> str:
    """Return a queue name no other test run uses."""
    return f"mqt-{RUN_ID}-{prefix}-{next(_counter)}"


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
            return True
    except OSError:
        return False


def require_broker(kind: str) -> str:
    """Return the URL of broker ``kind``; skip if unreachable, but fail under CI."""
    url = BROKERS[kind]
    if kind not in ("memory", "fakeredis") and not _reachable(url):
        message = f"{kind} broker not reachable at {urlsplit(url).hostname}:{urlsplit(url).port}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires the real brokers", pytrace=False)
        pytest.skip(message)
    return url


def cleanup(app: App) -> None:
    """Delete every queue the app used (its tasks' and configured ones), then reset it."""
    names = set(app.task_queues()) | set(app.queues) | set(app.transport._declared)
    names = {n for n in names if n.startswith(f"mqt-{RUN_ID}")}
    # Dead-letter queues too: a transport may create them without declaring them.
    names |= {n + DLQ_SUFFIX for n in names if not n.endswith(DLQ_SUFFIX)}
    if names and not app.settings.broker_url.startswith("memory"):
        try:
            app.transport.delete([app.queue(n) for n in names])
        except Exception:  # best effort: the test may have broken the connection on purpose
            pass
    reset(app)
