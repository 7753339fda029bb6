"""Start-up validation: configurations that would misbehave are refused before a message moves."""

from __future__ import annotations

import subprocess

import pytest
import structlog.testing
import tenacity

from mqtasks import (
    App,
    CircuitBreaker,
    ConfigurationError,
    QueueSpec,
    RetryPolicy,
    UnknownTransport,
)
from mqtasks.testing import running_worker
from mqtasks.validation import check_app, max_backoff, retry_schedule, unenforced_limits
from mqtasks.worker import Worker
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.cli import PYTHON, ROOT, clean_env

#: kombu's Redis transport on a port nothing listens on: checks must not need the broker.
KOMBU_REDIS = "redis+kombu://127.0.0.1:1/0"


# -- prefetch and concurrency ---------------------------------------------------------


def test_prefetch_below_concurrency_is_refused() -> None:
    app = App("t", broker="memory://", concurrency=4, prefetch=2)
    with pytest.raises(ConfigurationError, match=r"prefetch \(2\) is below concurrency \(4\)"):
        app.check()
    with pytest.raises(ConfigurationError, match="2 worker threads would always be idle"):
        Worker(app)
    app.check(prefetch=4)
    Worker(app, prefetch=8)


# -- retries the transport cannot hold -----------------------------------------------------


def test_retries_that_wait_are_refused_where_the_broker_cannot_hold_them() -> None:
    app = App("t", broker=KOMBU_REDIS, default_queue="emails")

    @app.task(name="emails.send", max_retries=3, retry_backoff=tenacity.wait_fixed(90))
    def send() -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        app.check()
    message = str(caught.value)
    assert "Queue 'emails', task 'emails.send'" in message
    assert "wait up to 90 s" in message and "visibility_timeout, 3600 s" in message
    assert "Use redis://" in message
    with pytest.raises(ConfigurationError, match=r"emails\.send"):
        Worker(app)


def test_the_visibility_timeout_named_is_the_transports_own() -> None:
    app = App("t", broker=KOMBU_REDIS, transport_options={"visibility_timeout": 600})

    @app.task(max_retries=1, retry_backoff=1)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="visibility_timeout, 600 s"):
        app.check()


def test_a_visibility_timeout_a_running_task_can_outlast_is_refused() -> None:
    """kombu hands a message unacknowledged for visibility_timeout to another
    worker; a stopping worker lets its tasks run shutdown_timeout (30 s) more."""
    app = App("t", broker=KOMBU_REDIS, transport_options={"visibility_timeout": 10})
    with pytest.raises(ConfigurationError) as caught:
        app.check()
    message = str(caught.value)
    assert "visibility_timeout is 10 s, but shutdown_timeout is 30 s" in message
    assert "Set visibility_timeout above your longest task" in message
    with pytest.raises(ConfigurationError, match="shutdown_timeout is 30 s"):
        Worker(app)
    App("t", broker=KOMBU_REDIS, transport_options={"visibility_timeout": 31}).check()
    App(
        "t", broker=KOMBU_REDIS, shutdown_timeout=5, transport_options={"visibility_timeout": 10}
    ).check()
    App("t", broker=KOMBU_REDIS).check()  # kombu's default: an hour


def test_a_worker_checks_the_visibility_timeout_against_its_own_shutdown_timeout() -> None:
    app = App("t", broker=KOMBU_REDIS, transport_options={"visibility_timeout": 45})
    with pytest.raises(ConfigurationError, match="shutdown_timeout is 60 s"):
        Worker(app, shutdown_timeout=60)  # mqtasks worker --shutdown-timeout 60
    Worker(app, shutdown_timeout=20)


@pytest.mark.parametrize("bad", [0, -5, "600", True, float("nan")])
def test_a_visibility_timeout_that_is_not_positive_seconds_is_refused(bad: object) -> None:
    app = App("t", broker=KOMBU_REDIS, transport_options={"visibility_timeout": bad})
    with pytest.raises(ConfigurationError, match="must be a positive number of seconds"):
        app.check()


def test_tasks_that_never_wait_to_retry_pass_on_every_broker() -> None:
    app = App("t", broker=KOMBU_REDIS)

    @app.task(max_retries=0)
    def once() -> None: ...

    @app.task(max_retries=5, retry_backoff=0)
    def at_once() -> None: ...

    app.check()
    for url in ("redis://127.0.0.1:1/0", "amqp://127.0.0.1:1//", "memory://"):
        held = App("t", broker=url)

        @held.task(max_retries=3, retry_backoff=tenacity.wait_fixed(7200))
        def slow() -> None: ...

        held.check()  # these brokers hold the delay themselves


def test_only_the_queues_a_worker_consumes_are_checked() -> None:
    app = App("t", broker=KOMBU_REDIS)

    @app.task(queue="slow", max_retries=2, retry_backoff=5)
    def slow() -> None: ...

    @app.task(queue="fast", max_retries=0)
    def fast() -> None: ...

    app.check(["fast"])
    with pytest.raises(ConfigurationError, match="Queue 'slow'"):
        app.check(["slow"])


# -- queue options ------------------------------------------------------------------


def test_queue_options_the_broker_cannot_honour_are_reported_with_the_rest() -> None:
    app = App(
        "t",
        broker="memory://",
        concurrency=2,
        prefetch=1,
        queues=[QueueSpec("short", message_ttl=5), QueueSpec("crashy", delivery_limit=3)],
    )
    with pytest.raises(ConfigurationError) as caught:
        app.check(["short", "crashy"])
    lines = str(caught.value).splitlines()
    assert len(lines) == 2  # the idle threads and the TTL; memory:// counts deliveries
    assert "prefetch (1)" in lines[0] and "'short'" in lines[1] and "message_ttl" in lines[1]
    kombu_redis = App("t", broker=KOMBU_REDIS)
    kombu_redis.add_queue(QueueSpec("crashy", delivery_limit=3))
    with pytest.raises(ConfigurationError, match="'crashy': redis\\+kombu:// does not count"):
        check_app(kombu_redis, ["crashy"])
    kombu_redis.add_queue(QueueSpec("crashy", delivery_limit=0))  # off: nothing to count
    check_app(kombu_redis, ["crashy"])
    classic = App("t", broker="amqp://127.0.0.1:1//", queue_type="classic")
    classic.add_queue(QueueSpec("crashy", delivery_limit=3))
    check_app(classic, ["crashy"])  # the worker counts deliveries on classic queues


# -- the retry schedule's upper bound ----------------------------------------------------


def test_the_retry_schedule_counts_each_wait_at_its_upper_bound() -> None:
    fixed = RetryPolicy(max_retries=3, backoff=2)
    assert [max_backoff(fixed, a) for a in (1, 2, 3)] == [2, 2, 2]
    assert retry_schedule(fixed) == 6
    jitter = RetryPolicy(max_retries=4, backoff=tenacity.wait_exponential_jitter(jitter=1, max=5))
    assert [max_backoff(jitter, a) for a in (1, 2, 3, 4)] == [2, 3, 5, 5]
    assert retry_schedule(RetryPolicy(max_retries=2, backoff=tenacity.wait_random(1, 4))) == 8
    full = RetryPolicy(max_retries=3, backoff=tenacity.wait_random_exponential(multiplier=1))
    assert retry_schedule(full) == 1 + 2 + 4
    both = RetryPolicy(max_retries=2, backoff=tenacity.wait_fixed(1) + tenacity.wait_random(0, 3))
    assert retry_schedule(both) == 8
    chain = tenacity.wait_chain(tenacity.wait_fixed(1), tenacity.wait_fixed(10))
    assert retry_schedule(RetryPolicy(max_retries=3, backoff=chain)) == 21
    assert retry_schedule(RetryPolicy(max_retries=0, backoff=60)) == 0
    default = RetryPolicy()  # wait_exponential_jitter(initial=1, max=300), 3 retries
    assert [max_backoff(default, a) for a in (1, 2, 3)] == [2, 3, 5]


# -- the command line -----------------------------------------------------------------------


def test_a_worker_with_a_bad_config_refuses_to_start() -> None:
    # tests.crash_app's crash.flaky retries after 2 s; kombu's Redis cannot hold that.
    env = clean_env(MQTASKS_BROKER_URL=KOMBU_REDIS, CRASH_TEST_QUEUE="mqt-validation")
    result = subprocess.run(
        [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.crash_app", "--log-format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "task 'crash.flaky': its retries wait up to 2 s" in result.stderr
    assert "worker.started" not in result.stderr


def test_a_broker_url_naming_no_transport_is_raised_by_check() -> None:
    app = App("t", broker="amqp2://127.0.0.1//")
    with pytest.raises(UnknownTransport, match="amqp2"):
        app.check()
    Worker(app)  # the worker reports it when it connects (exit code 1 on the command line)


def test_a_delivery_limit_the_broker_cannot_count_is_said_at_start_up() -> None:
    """redis+kombu:// has no delivery counts: the app-wide default limit is not silently dropped."""
    kombu_redis = require_broker("redis").replace("redis://", "redis+kombu://", 1)
    app = App("limits", broker=kombu_redis)
    name = unique_name("uncounted")

    @app.task(queue=name, max_retries=0)
    def work() -> None: ...

    try:
        (warning,) = unenforced_limits(app, [name])
        assert "does not count deliveries" in warning
        assert "delivery_limit=0" in warning
        with structlog.testing.capture_logs() as logs, running_worker(app, queues=[name]):
            pass
        unsafe = [e["detail"] for e in logs if e["event"] == "broker.unsafe_config"]
        assert any("does not count deliveries" in d for d in unsafe)
        # Turned off, or on brokers that count, nothing is said.
        off = App("limits-off", broker=kombu_redis, delivery_limit=0)
        assert unenforced_limits(off, [name]) == []
        assert unenforced_limits(App("limits-memory", broker="memory://"), [name]) == []
    finally:
        cleanup(app)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"rate_limit": "5/s"}, "rate_limit"),
        ({"concurrency_limit": 2}, "concurrency_limit"),
        ({"circuit": "partner"}, "circuit"),
    ],
)
def test_flow_control_is_refused_where_the_broker_cannot_hold_a_waiting_task(
    options: dict[str, object], named: str
) -> None:
    """A task that must wait is deferred through a broker-held delay: on a transport
    without delays it would be handed back at once, in a loop."""
    app = App(
        "t",
        broker=KOMBU_REDIS,
        backend="memory://",
        default_queue="partner",
        circuits=[CircuitBreaker("partner")],
    )

    @app.task(name="partner.call", max_retries=0, **options)  # type: ignore[call-overload]
    def call() -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        app.check()
    message = str(caught.value)
    assert "Queue 'partner', task 'partner.call'" in message and named in message
    assert "Use redis://" in message
