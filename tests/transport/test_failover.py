"""A failover list of broker URLs: a worker whose first broker is down runs
tasks through the next one, with mqtasks' own transport class."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from mqtasks import App, ConfigurationError
from mqtasks.testing import drain, running_worker

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_amqp_worker_runs_tasks_through_the_second_broker_of_a_list(
    amqp_url: str, make_app: Callable[..., App]
) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{_closed_port()}//"
    app = make_app(f"{down};{amqp_url}", publish_retries=3)
    seen: list[int] = []

    @app.task
    def record(n: int) -> None:
        seen.append(n)

    with running_worker(app, concurrency=1) as worker:
        for n in range(3):
            record.delay(n)
        drain(worker, timeout=30)
    assert sorted(seen) == [0, 1, 2]


def test_a_failover_list_on_redis_is_refused_not_misread(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="failover"):
        App("t", broker=f"{redis_url};redis://127.0.0.1:1/0").transport.declare([])
