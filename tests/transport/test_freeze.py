"""A broker that freezes (accepts bytes, answers nothing): ``delay()`` gives up
within its publish timeout instead of hanging.

The freeze is a loopback proxy owned by the test that stops forwarding while
keeping every socket open, as a ``kill -STOP`` of the broker would look from
the client; the shared brokers are never stopped.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from mqtasks import App, TransportError
from reliability.proxy import TcpProxy
from tests._helpers.brokers import cleanup, require_broker

pytestmark = pytest.mark.integration

#: Seconds delay() may take in these tests.
PUBLISH_TIMEOUT = 2.0
#: What the test tolerates beyond it: thread scheduling on a busy machine, not a hang.
SLACK = 2.0


class FreezingProxy(TcpProxy):
    """A TcpProxy whose ``frozen`` flag stops all forwarding, sockets left open."""

    def __init__(self, target_port: int) -> None:
        self.thawed = threading.Event()
        self.thawed.set()
        super().__init__(target_port)

    def forward(self, src: socket.socket, data: bytes) -> bool:
        self.thawed.wait()  # frozen: hold the bytes, answer nothing
        return True


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_delay_is_bounded_by_the_publish_timeout_while_the_broker_is_frozen(
    kind: str, make_app: Callable[..., App]
) -> None:
    url = require_broker(kind)
    proxy = FreezingProxy(urlsplit(url).port or (5672 if kind == "amqp" else 6379))
    app: App | None = None
    try:
        app = make_app(proxy.url_for(url), publish_timeout=PUBLISH_TIMEOUT, heartbeat=0)

        @app.task
        def noop(n: int) -> None: ...

        noop.delay(0)  # connected, queue declared, publishing works
        # When the broker stops answering, on the open connection and on new ones
        proxy.thawed.clear()
        for n in (1, 2):
            started = time.monotonic()
            # Then delay() raises, saying the task may not be enqueued, within its timeout
            with pytest.raises(TransportError, match="NOT"):
                noop.delay(n)
            elapsed = time.monotonic() - started
            assert elapsed < PUBLISH_TIMEOUT + SLACK, f"delay() took {elapsed:.1f} s"
        # And once the broker answers again, publishing works again
        proxy.thawed.set()
        noop.delay(3)
    finally:
        proxy.thawed.set()
        if app is not None:
            # The app reaches the broker only through the proxy: delete its queue
            # while the proxy still forwards (the fixture's own cleanup comes too late).
            cleanup(app)
        proxy.close()
