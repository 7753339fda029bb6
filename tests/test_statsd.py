"""StatsD metrics: packets as a real StatsD server on 127.0.0.1 receives them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import tenacity

from mqtasks import App, ConfigurationError, Reject, Settings, Worker
from mqtasks.middleware import StatsdMetrics, default_middleware
from mqtasks.middleware.statsd import UNKNOWN_TASK, parse_statsd_url, sanitize
from mqtasks.testing import drain, memory_app, reset, running_worker
from tests._helpers.brokers import require_broker
from tests._helpers.publish import raw_publish
from tests._helpers.statsd import StatsdServer, statsd_server

__all__ = ["statsd_server"]  # the fixture, re-exported for pytest


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("udp://127.0.0.1:8125", "must start with statsd://"),
        ("statsd:///mqtasks", "names no host"),
        ("statsd://127.0.0.1:notaport/mqtasks", "invalid port"),
        ("statsd://127.0.0.1:8125/my prefix", "may hold only"),
        ("statsd://user:pw@127.0.0.1:8125/mqtasks", "takes no user"),
    ],
)
def test_a_bad_statsd_url_is_refused_when_the_app_is_made(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        memory_app(statsd_url=url)


def test_statsd_url_comes_from_the_environment_and_picks_the_default_stack() -> None:
    settings = Settings.from_env({"MQTASKS_STATSD_URL": "statsd://127.0.0.1:9125/shop.prod"})
    metrics = [m for m in default_middleware(settings) if isinstance(m, StatsdMetrics)]
    assert len(metrics) == 1
    assert (metrics[0].host, metrics[0].port, metrics[0].prefix) == ("127.0.0.1", 9125, "shop.prod")
    assert not any(isinstance(m, StatsdMetrics) for m in default_middleware(Settings()))


def test_url_defaults_and_sanitised_names() -> None:
    assert parse_statsd_url("statsd://stats.local") == ("stats.local", 8125, "mqtasks")
    assert parse_statsd_url("statsd://[::1]:9000/a/b") == ("::1", 9000, "a.b")
    assert sanitize("shop.send email:now|x@y") == "shop_send_email_now_x_y"
    with pytest.raises(ConfigurationError, match="gauge_interval"):
        StatsdMetrics("statsd://127.0.0.1", gauge_interval=0)


def test_sending_never_fails_and_errors_are_logged_at_most_once_a_minute(
    statsd_server: StatsdServer,
) -> None:
    metrics = StatsdMetrics(statsd_server.url)
    with structlog.testing.capture_logs() as logs:
        # A datagram over the UDP limit: the kernel refuses it (EMSGSIZE)
        metrics.incr("x" * 70_000)
        metrics.incr("y" * 70_000)
        metrics.incr("fine")
        metrics.flush()
    failures = [e for e in logs if e["event"] == "statsd.send_failed"]
    assert len(failures) == 1
    assert "Message too long" in failures[0]["error"]
    statsd_server.wait_for(lambda: statsd_server.count("mqtasks.fine") == 1, "the good stat")


def test_an_unresolvable_host_does_not_stop_tasks() -> None:
    with structlog.testing.capture_logs() as logs:
        app = memory_app(statsd_url="statsd://mqtasks-test.invalid:8125/mqtasks")

        @app.task
        def ok() -> int:
            return 1

        try:
            ok.delay()
            with running_worker(app) as worker:
                drain(worker)
        finally:
            reset(app)
    # Said once (the host is looked up again at most once per interval), tasks unharmed.
    assert [e["event"] for e in logs].count("statsd.send_failed") == 1


@pytest.fixture(params=["memory", "amqp", "redis"])
def metrics_app(
    request: pytest.FixtureRequest, make_app: Callable[..., App], statsd_server: StatsdServer
) -> App:
    """An app on each transport with only StatsD metrics, to the test's server."""
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    app = make_app(require_broker(request.param))
    app.middleware[:] = [StatsdMetrics(statsd_server.url, gauge_interval=0.05, worker_name="w1")]
    return app


def test_task_outcomes_are_counted_and_timed_per_task(
    metrics_app: App, statsd_server: StatsdServer
) -> None:
    app = metrics_app
    calls: list[int] = []

    @app.task(name="shop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="shop.flaky", max_retries=2, retry_backoff=tenacity.wait_none())
    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")

    @app.task(name="shop.broken", max_retries=0)
    def broken() -> None:
        raise KeyError("gone")

    @app.task(name="shop.refuse")
    def refuse() -> None:
        raise Reject("no")

    # Given two good calls, a task that fails twice then succeeds, one that
    # always fails, one that rejects its input, and a message for no task
    add.delay(1, 2)
    add.delay(3, 4)
    flaky.delay()
    broken.delay()
    refuse.delay()
    raw_publish(
        app,
        app.settings.default_queue,
        b'{"args": [], "kwargs": {}}',
        content_type="application/json",
        content_encoding="utf-8",
        headers={"mqtasks-task": "nobody.knows", "mqtasks-protocol": 1},
        message_id="stray-1",
    )

    # When a worker runs them all
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
        # Then the gauges report the dead letters (broken, refuse, the stray one)
        dlq_gauge = f"mqtasks.queue.dead_letters.{sanitize(app.settings.default_queue)}"
        statsd_server.wait_for(lambda: statsd_server.gauge(dlq_gauge) == 3, "dead-letter gauge")
        depth = f"mqtasks.queue.depth.{sanitize(app.settings.default_queue)}"
        statsd_server.wait_for(lambda: statsd_server.gauge(depth) == 0, "queue depth gauge")
        in_flight = "mqtasks.worker.in_flight.w1"
        statsd_server.wait_for(lambda: statsd_server.gauge(in_flight) == 0, "in-flight gauge")

    # And every outcome is counted under the task's sanitised name
    count = statsd_server.count
    assert count("mqtasks.task.published.shop_add") == 2
    assert count("mqtasks.task.received.shop_add") == 2
    assert count("mqtasks.task.succeeded.shop_add") == 2
    assert count("mqtasks.task.received.shop_flaky") == 3
    assert count("mqtasks.task.failed.shop_flaky") == 2
    assert count("mqtasks.task.retried.shop_flaky") == 2
    assert count("mqtasks.task.succeeded.shop_flaky") == 1
    assert count("mqtasks.task.failed.shop_broken") == 1
    assert count("mqtasks.task.dead_lettered.shop_broken") == 1
    assert count("mqtasks.task.retried.shop_broken") == 0
    assert count("mqtasks.task.rejected.shop_refuse") == 1
    assert count("mqtasks.task.failed.shop_refuse") == 0
    assert count("mqtasks.task.dead_lettered.shop_refuse") == 1
    assert count(f"mqtasks.task.rejected.{UNKNOWN_TASK}") == 1
    assert count(f"mqtasks.task.dead_lettered.{UNKNOWN_TASK}") == 1
    assert not [line for line in statsd_server.lines if "nobody" in line]
    # And timed: each run, the wait of first attempts, and end to end on success
    assert len(statsd_server.timings("mqtasks.task.run_time.shop_add")) == 2
    assert len(statsd_server.timings("mqtasks.task.queue_time.shop_add")) == 2
    assert len(statsd_server.timings("mqtasks.task.queue_time.shop_flaky")) == 1
    assert len(statsd_server.timings("mqtasks.task.end_to_end.shop_flaky")) == 1
    assert len(statsd_server.timings("mqtasks.task.end_to_end.shop_broken")) == 0
    assert all(v >= 0 for v in statsd_server.timings("mqtasks.task.end_to_end.shop_add"))


def test_a_redelivered_message_is_counted(metrics_app: App, statsd_server: StatsdServer) -> None:
    app = metrics_app
    if app.settings.broker_url.startswith("memory"):
        pytest.skip("kombu's memory transport does not flag redeliveries")
    running, gate = threading.Event(), threading.Event()

    @app.task(name="jobs.hold")
    def hold() -> None:
        running.set()
        gate.wait(10)

    @app.task(name="jobs.one")
    def one() -> None: ...

    # Given a worker running one task while it holds another, not started
    hold.delay()
    one.delay()
    first = Worker(app, concurrency=1, prefetch=2, shutdown_timeout=10)
    first.start()
    assert running.wait(10)
    statsd_server.wait_for(lambda: first.received == 2, "both deliveries")
    # When it stops: it hands the waiting message back to the broker
    stopping = threading.Thread(target=first.stop)
    stopping.start()
    statsd_server.wait_for(first._stopping.is_set, "the stop to begin")
    gate.set()
    stopping.join(15)
    # Then the next worker gets it redelivered, and counts it
    with running_worker(app) as worker:
        drain(worker)
    statsd_server.wait_for(
        lambda: statsd_server.count("mqtasks.task.succeeded.jobs_one") == 1, "the second run"
    )
    assert statsd_server.count("mqtasks.task.received.jobs_one") == 1
    assert statsd_server.count("mqtasks.task.redelivered.jobs_one") == 1
    assert statsd_server.count("mqtasks.task.redelivered.jobs_hold") == 0


def test_in_flight_gauge_counts_running_tasks(statsd_server: StatsdServer) -> None:
    app = memory_app()
    app.middleware[:] = [StatsdMetrics(statsd_server.url, gauge_interval=0.02, worker_name="w:2")]
    running, gate = threading.Event(), threading.Event()

    @app.task
    def hold() -> None:
        running.set()
        gate.wait(10)

    try:
        hold.delay()
        with running_worker(app) as worker:
            assert running.wait(10)
            gauge = "mqtasks.worker.in_flight.w_2"
            statsd_server.wait_for(lambda: statsd_server.gauge(gauge) == 1, "one task in flight")
            gate.set()
            drain(worker)
            statsd_server.wait_for(lambda: statsd_server.gauge(gauge) == 0, "none in flight")
    finally:
        gate.set()
        reset(app)


PRODUCER = """
import sys

from mqtasks import App

app = App("producer", broker="memory://")


@app.task
def noop(i: int) -> None: ...


for i in range(int(sys.argv[1])):
    noop.delay(i)
"""


@pytest.mark.parametrize("n", [55, 2000])
def test_a_producer_that_exits_sends_its_last_published_counters(
    statsd_server: StatsdServer, tmp_path: Path, n: int
) -> None:
    """What is still buffered at exit goes out before the socket closes, never through a closed one."""
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    env = {**os.environ, "MQTASKS_STATSD_URL": statsd_server.url}
    done = subprocess.run(
        [sys.executable, str(script), str(n)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    stat = "mqtasks.task.published.producer_noop"
    statsd_server.wait_for(lambda: statsd_server.count(stat) >= n, f"{n} published counts")
    assert statsd_server.count(stat) == n
    assert "statsd.send_failed" not in done.stdout + done.stderr
