"""The brokers tests run on (memory, the local RabbitMQ and Redis, fakeredis, SQS on a
moto server this process starts), names
no other test run uses, and the cleanup of what a test declared.

The local brokers are shared by every engineer and CI run on the machine: every
queue a test makes is named by :func:`unique_name`, and :func:`cleanup` deletes
only those.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import tempfile
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

from mqtasks import App
from mqtasks.testing import FAKE_REDIS_URL, reset
from mqtasks.transport.base import DLQ_SUFFIX

__all__ = [
    "AMQP_URL",
    "BROKERS",
    "POSTGRES_URL",
    "REDIS_URL",
    "RUN_ID",
    "SQLITE_URL",
    "cleanup",
    "require_broker",
    "sqs_url",
    "stop_sqs",
    "unique_name",
]

#: The local RabbitMQ used by integration tests.
AMQP_URL = os.environ.get("MQTASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The local Redis used by integration tests (a database of its own).
REDIS_URL = os.environ.get("MQTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

#: The local PostgreSQL used as a broker by integration tests (trust auth).
POSTGRES_URL = os.environ.get(
    "MQTASKS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

#: Unique per test run, so runs sharing a broker never see each other's queues.
RUN_ID = uuid.uuid4().hex[:8]

#: A database file of this test run's own for the ``sqlite://`` transport.
SQLITE_URL = f"sqlite:///{tempfile.gettempdir()}/mqt-{RUN_ID}-broker.db"

#: ``fakeredis``: the ``redis://`` transport on an in-process fakeredis server, per app.
BROKERS = {
    "memory": "memory://",
    "amqp": AMQP_URL,
    "redis": REDIS_URL,
    "fakeredis": FAKE_REDIS_URL,
    "postgresql": POSTGRES_URL,
    "sqlite": SQLITE_URL,
}
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


#: Credentials and region of the local SQS server, set in this process's environment
#: (and its children's) when the server starts; never a real AWS account.
SQS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_sqs_lock = threading.Lock()
_sqs: dict[str, Any] = {}


def sqs_url() -> str:
    """Return ``sqs://127.0.0.1:<port>`` of moto's SQS server, started on first use.

    One server per test run, on a free loopback port, in this process
    (moto's ``ThreadedMotoServer``); :func:`stop_sqs` stops it. The AWS
    variables of :data:`SQS_ENV` are set for this process only, so no test
    can reach a real AWS account.

    Raises:
        ImportError: moto is not installed (``pip install -e ".[dev]"``).
    """
    with _sqs_lock:
        if "url" not in _sqs:
            from moto.server import ThreadedMotoServer

            for name in ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
                os.environ.pop(name, None)
            os.environ.update(SQS_ENV)
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            _sqs.update(server=server, url=f"sqs://{host}:{port}")
        return str(_sqs["url"])


def stop_sqs() -> None:
    """Stop the SQS server :func:`sqs_url` started, if it did."""
    with _sqs_lock:
        server = _sqs.pop("server", None)
        _sqs.pop("url", None)
    if server is not None:
        with contextlib.suppress(Exception):
            server.stop()


def require_broker(kind: str) -> str:
    """Return the URL of broker ``kind``; skip if unreachable, but fail under CI."""
    if kind == "sqs":
        try:
            return sqs_url()
        except ImportError as exc:
            message = f"moto is not installed ({exc}); pip install -e '.[dev]'"
            if os.environ.get("CI"):
                pytest.fail(f"{message}; CI requires every broker", pytrace=False)
            pytest.skip(message)
    url = BROKERS[kind]
    if kind not in ("memory", "fakeredis", "sqlite") and not _reachable(url):
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
