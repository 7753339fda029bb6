"""A broker that goes away: the worker waits for it, and still stops when told to."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import pytest

from mqtasks.testing import drain, running_worker
from reliability.proxy import TcpProxy
from tests._helpers.brokers import require_broker
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_worker_reconnects_after_an_outage_and_stops_during_one(kind: str, make_app) -> None:
    url = require_broker(kind)
    proxy = TcpProxy(urlsplit(url).port or (5672 if kind == "amqp" else 6379))
    try:
        direct = make_app(url)
        app = make_app(proxy.url_for(url), default_queue=direct.settings.default_queue)
        seen: list[int] = []
        lock = threading.Lock()

        @app.task(name="outage.record")
        def record(n: int) -> None:
            with lock:
                seen.append(n)

        direct.task(name="outage.record")(record.fn)  # same task, published around the proxy
        with running_worker(app, shutdown_timeout=2) as worker:
            # Given a broker outage as seen by the worker, while tasks are published
            # (the broker holds them; mqtasks' Redis transport fetches atomically,
            # so a cut connection loses nothing there either)
            proxy.cut(refuse=True)
            for n in range(5):
                direct.get_task("outage.record").delay(n)
            wait_for(lambda: proxy.refused >= 1, "the worker to find the broker unreachable")
            # When the broker is reachable again, the worker reconnects by itself
            proxy.resume()
            drain(worker, timeout=30)
            # RabbitMQ may have delivered some of them to the cut consumer before it
            # saw that connection close; they come back once it does (drain() sees
            # no ready message meanwhile), so wait for all five.
            wait_for(lambda: len(seen) >= 5, lambda: f"all five tasks (ran: {seen})", 30)
            assert sorted(seen) == list(range(5))
            # And when the broker goes away again, stop() still returns promptly
            proxy.cut(refuse=True)
            started = time.monotonic()
            worker.stop()
            assert time.monotonic() - started < 10
    finally:
        proxy.close()
