"""Prometheus metrics: what a scrape of the HTTP endpoint returns after tasks ran on a real worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Callable, Iterator

import httpx
import pytest
import tenacity
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mqtasks import App, ConfigurationError, Reject
from mqtasks.middleware.prometheus import (
    MULTIPROC_DIR_ENV,
    RUN_TIME_BUCKETS,
    UNKNOWN_TASK,
    MetricsServer,
    PrometheusMetrics,
    SupervisorMetrics,
    metrics_asgi_app,
    serve_metrics,
)
from mqtasks.testing import drain, memory_app, reset, running_worker
from tests._helpers.brokers import require_broker
from tests._helpers.publish import raw_publish
from tests._helpers.wait import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(server: MetricsServer) -> Samples:
    with urllib.request.urlopen(server.url, timeout=5) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    running = serve_metrics(0, registry=registry)
    yield running
    running()


@pytest.fixture(params=["memory", "redis"])
def metrics_app(
    request: pytest.FixtureRequest, make_app: Callable[..., App], registry: CollectorRegistry
) -> App:
    """An app on the memory broker and on Redis, with only Prometheus metrics."""
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    app = make_app(require_broker(request.param))
    app.middleware[:] = [PrometheusMetrics(registry, gauge_interval=0.05)]
    return app


def test_the_missing_extra_is_a_configuration_error_that_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from mqtasks.middleware.prometheus import PrometheusMetrics\n"
        "PrometheusMetrics()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "ConfigurationError" in run.stderr
    assert 'pip install "mqtasks[prometheus]"' in run.stderr


def test_bad_arguments_and_a_taken_port_are_refused(server: MetricsServer) -> None:
    with pytest.raises(ConfigurationError, match="gauge_interval"):
        PrometheusMetrics(CollectorRegistry(), gauge_interval=0)
    with pytest.raises(ConfigurationError, match="Cannot serve metrics"):
        serve_metrics(server.port, server.host, registry=CollectorRegistry())
    # The supervisor's is refused before any child starts, leaving nothing behind
    with pytest.raises(ConfigurationError, match="Cannot serve metrics"):
        SupervisorMetrics(server.port, server.host)
    assert MULTIPROC_DIR_ENV not in os.environ


def test_task_outcomes_are_counted_and_timed_per_task(
    metrics_app: App, server: MetricsServer
) -> None:
    app = metrics_app
    queue = app.settings.default_queue
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
        queue,
        b'{"args": [], "kwargs": {}}',
        content_type="application/json",
        content_encoding="utf-8",
        headers={"mqtasks-task": "nobody.knows", "mqtasks-protocol": 1},
        message_id="stray-1",
    )

    # When a worker runs them all
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
        # Then the gauges report the dead letters (broken, refuse, the stray one) and an empty queue
        wait_for(
            lambda: value(scrape(server), "mqtasks_queue_dead_letters", queue=queue) == 3,
            "the dead-letter gauge",
        )
        samples = scrape(server)
        assert value(samples, "mqtasks_queue_depth", queue=queue) == 0
        assert value(samples, "mqtasks_worker_in_flight") == 0

    # And every outcome is counted under the task's name, from the HTTP endpoint
    samples = scrape(server)
    expected = {
        ("published", "shop.add"): 2,
        ("received", "shop.add"): 2,
        ("succeeded", "shop.add"): 2,
        ("received", "shop.flaky"): 3,
        ("failed", "shop.flaky"): 2,
        ("retried", "shop.flaky"): 2,
        ("succeeded", "shop.flaky"): 1,
        ("failed", "shop.broken"): 1,
        ("dead_lettered", "shop.broken"): 1,
        ("retried", "shop.broken"): 0,
        ("rejected", "shop.refuse"): 1,
        ("failed", "shop.refuse"): 0,
        ("dead_lettered", "shop.refuse"): 1,
        # And a name the app does not know is no label of its own
        ("rejected", UNKNOWN_TASK): 1,
        ("dead_lettered", UNKNOWN_TASK): 1,
    }
    counted = {
        (stem, task): value(samples, f"mqtasks_task_{stem}_total", task=task)
        for stem, task in expected
    }
    assert counted == expected
    assert not [key for key in samples if "nobody.knows" in str(key)]
    # And timed as histograms: each run, the wait of first attempts, end to end on success
    assert value(samples, "mqtasks_task_run_time_seconds_count", task="shop.add") == 2
    assert value(samples, "mqtasks_task_run_time_seconds_count", task="shop.flaky") == 3
    assert value(samples, "mqtasks_task_queue_time_seconds_count", task="shop.flaky") == 1
    assert value(samples, "mqtasks_task_end_to_end_seconds_count", task="shop.flaky") == 1
    assert value(samples, "mqtasks_task_end_to_end_seconds_count", task="shop.broken") == 0
    assert (value(samples, "mqtasks_task_run_time_seconds_sum", task="shop.add") or -1) >= 0
    inf = value(samples, "mqtasks_task_run_time_seconds_bucket", task="shop.add", le="+Inf")
    assert inf == 2


def test_the_asgi_app_serves_the_same_metrics(registry: CollectorRegistry) -> None:
    app = memory_app()
    app.middleware[:] = [PrometheusMetrics(registry)]

    @app.task(name="shop.ping")
    def ping() -> None: ...

    try:
        ping.delay()
        with running_worker(app) as worker:
            drain(worker)
    finally:
        reset(app)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=metrics_asgi_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
            return await client.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "mqtasks_task_succeeded_total", task="shop.ping") == 1
    assert value(samples, "mqtasks_task_run_time_seconds_count", task="shop.ping") == 1


def _child(directory: str, tasks: int, in_flight: int) -> None:
    """In a forked child: run ``tasks`` tasks on a worker, leave ``in_flight`` on the gauge."""
    code = 1
    try:
        assert os.environ[MULTIPROC_DIR_ENV] == directory
        app = memory_app(f"child-{os.getpid()}")
        metrics = PrometheusMetrics(CollectorRegistry(), gauge_interval=0.05)
        app.middleware[:] = [metrics]

        @app.task(name="shop.count")
        def count() -> None: ...

        for _ in range(tasks):
            count.delay()
        with running_worker(app) as worker:
            drain(worker)
        # As if it died with tasks running: its gauge keeps the last value it set
        metrics.families.in_flight.set(in_flight)
        code = 0
    finally:
        os._exit(code)


def test_forked_children_aggregate_in_the_supervisor_and_dead_ones_lose_their_gauges() -> None:
    # Given the supervisor's metrics, made before the children start
    supervisor = SupervisorMetrics(0)
    try:
        directory = supervisor.directory
        assert os.environ[MULTIPROC_DIR_ENV] == directory
        # When two forked children run tasks and write to the directory
        pids = []
        for tasks, in_flight in ((3, 2), (4, 5)):
            with warnings.catch_warnings():
                # Python 3.12+ warns of fork() with threads; the child uses none it inherits.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                _child(directory, tasks, in_flight)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        server = supervisor.start()

        # Then the supervisor serves their sum
        samples = scrape(server)
        assert value(samples, "mqtasks_task_published_total", task="shop.count") == 7
        assert value(samples, "mqtasks_task_succeeded_total", task="shop.count") == 7
        assert value(samples, "mqtasks_task_run_time_seconds_count", task="shop.count") == 7
        assert value(samples, "mqtasks_task_run_time_seconds_bucket", task="shop.count", le="+Inf")
        assert value(samples, "mqtasks_worker_in_flight") == 7

        # And once a child is marked dead its gauge goes, its counts stay
        supervisor.child_exited(pids[0])
        samples = scrape(server)
        assert value(samples, "mqtasks_worker_in_flight") == 5
        assert value(samples, "mqtasks_task_succeeded_total", task="shop.count") == 7
    finally:
        supervisor.stop()
    # And the run's directory is gone with it
    assert not os.path.exists(directory)
    assert MULTIPROC_DIR_ENV not in os.environ


def test_timings_noted_by_a_thread_reach_the_buckets_as_observe_puts_them() -> None:
    # Given amounts on, between and beyond the bucket bounds
    amounts = [0.0, 0.001, 0.0011, 0.25, 0.2500001, 299.0, 300.0, 301.0, 1e9] * 3
    direct = CollectorRegistry()
    histogram = Histogram("t", "t", ["task"], registry=direct, buckets=RUN_TIME_BUCKETS)
    for amount in amounts:
        histogram.labels("x").observe(amount)
    # When a worker thread notes them and its tally is written in one go
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    app = memory_app()
    run_time = metrics.task(app, "anything").run_time
    tally = metrics._tally()
    tally.observed[run_time] = list(amounts)
    metrics.flush()
    # Then every bucket, the count and the sum (to rounding) are those observe() gives
    buffered = parse(generate_latest(registry).decode())
    expected = parse(generate_latest(direct).decode())
    for (name, labels), amount in expected.items():
        if name.startswith("t_") and not name.endswith("_created"):
            ours = dict(labels) | {"task": UNKNOWN_TASK}
            ours_value = value(buffered, "mqtasks_task_run_time_seconds" + name[1:], **ours)
            assert ours_value == pytest.approx(amount, rel=1e-12), name


def test_a_forked_child_does_not_write_what_its_parent_noted(registry: CollectorRegistry) -> None:
    # Given a publish counted by this thread and not written yet
    app = memory_app()
    metrics = PrometheusMetrics(registry)
    app.middleware[:] = [metrics]

    @app.task(name="shop.once")
    def once() -> None: ...

    try:
        once.delay()
    finally:
        reset(app)

    def published() -> float | None:
        # A scrape: it writes first what this process's threads noted
        return registry.get_sample_value("mqtasks_task_published_total", {"task": "shop.once"})

    # When a child forked now writes what it noted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork() with threads
        pid = os.fork()
    if pid == 0:
        os._exit(0 if published() == 0 else 1)
    _, status = os.waitpid(pid, 0)
    # Then the child wrote nothing, and the parent writes its count once
    assert os.waitstatus_to_exitcode(status) == 0
    assert published() == 1


@pytest.mark.integration
def test_a_process_without_a_worker_samples_the_queue_gauges_itself(
    make_app: Callable[..., App], registry: CollectorRegistry, server: MetricsServer
) -> None:
    # Given three messages waiting on RabbitMQ and a process that runs no worker
    app = make_app(require_broker("amqp"))
    metrics = PrometheusMetrics(registry)
    app.middleware[:] = [metrics]

    @app.task(name="shop.later")
    def later() -> None: ...

    for _ in range(3):
        later.delay()
    queue = app.settings.default_queue
    # When it samples its queues
    metrics.sample_queues(app, app.task_queues())
    # Then the page shows them, and the publishes counted
    samples = scrape(server)
    assert value(samples, "mqtasks_queue_depth", queue=queue) == 3
    assert value(samples, "mqtasks_queue_dead_letters", queue=queue) == 0
    assert value(samples, "mqtasks_task_published_total", task="shop.later") == 3
