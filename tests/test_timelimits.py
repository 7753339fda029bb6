"""Time limits (soft: an exception inside the task; hard: the task is stopped and
dead-lettered with reason ``time_limit``), ``Worker.terminate``, ``Worker.resize`` and
the recycle flag, on memory and the real brokers; their start-up checks."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import structlog

from mqtasks import (
    App,
    ConfigurationError,
    SoftTimeLimitExceeded,
    TaskFailed,
    Worker,
    current_message,
)
from mqtasks.testing import drain, running_worker
from mqtasks.validation import check_app
from tests._helpers.brokers import REDIS_URL
from tests._helpers.wait import wait_for
from tests.test_cli import MakeScenario, RunCli, run_cli, scenario  # noqa: F401
from tests.test_process import started_children
from tests.timelimit_app import HANG, SPIN, add_hung_tasks


@pytest.fixture
def results_app(broker_url: str, make_app: Callable[..., App]) -> App:
    """An app on each broker in turn, with a result backend."""
    return make_app(broker_url, backend="memory://")


@pytest.fixture
def blocker() -> Iterator[threading.Event]:
    """An event blocked tasks wait on (in C, where no asynchronous exception reaches
    them, as ``time.sleep(3600)``); set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


# -- soft -----------------------------------------------------------------------------


def test_a_soft_limit_raises_inside_a_thread_task_which_can_clean_up(results_app: App) -> None:
    app = results_app
    cleaned: list[int] = []

    @app.task(soft_time_limit=0.2, max_retries=1, retry_backoff=0)
    def spin() -> str:
        message = current_message()
        attempt = message.attempt if message is not None else 0
        try:
            while True:
                pass
        except SoftTimeLimitExceeded:
            cleaned.append(attempt)
            if attempt == 1:
                raise  # a failure: retried
            return "cleaned up"  # caught: a success

    with running_worker(app):
        assert spin.delay().get(timeout=15) == "cleaned up"
    assert cleaned == [1, 2]


def test_a_soft_limit_cancels_a_coroutine_task_and_it_is_retried(results_app: App) -> None:
    app = results_app
    cancelled: list[int] = []

    @app.task(soft_time_limit=0.2, max_retries=1, retry_backoff=0)
    async def slow() -> str:
        message = current_message()
        attempt = message.attempt if message is not None else 0
        if attempt == 2:
            return "second"
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(attempt)
            raise
        return "never"

    with structlog.testing.capture_logs() as logs, running_worker(app):
        assert slow.delay().get(timeout=15) == "second"
    assert cancelled == [1]
    [retried] = [e for e in logs if e["event"] == "task.retried"]
    assert "SoftTimeLimitExceeded" in retried["error"]


# -- hard -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loop", "blocking"])
def test_a_hard_limit_stops_a_hung_thread_task_and_the_worker_goes_on(
    results_app: App, blocker: threading.Event, kind: str
) -> None:
    app = results_app

    @app.task(time_limit=0.3)
    def hang() -> None:
        if kind == "loop":
            while True:
                pass
        blocker.wait(3600)

    @app.task
    def ok(x: int) -> int:
        return x

    with running_worker(app, concurrency=1) as worker:
        handle = hang.delay()
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=15)
        # The slot is free again: the worker's one thread was replaced.
        assert ok.delay(7).get(timeout=15) == 7
        drain(worker, raise_errors=False)
        assert worker.running == 0 and len(worker._pool) == 1
    assert (failed.value.state, failed.value.reason) == ("DEAD_LETTERED", "time_limit")
    assert failed.value.exc_type == "TimeLimitExceeded"
    [entry] = app.dead_letters()
    assert (entry.id, entry.reason) == (handle.id, "time_limit")


def test_a_task_that_ignores_its_soft_limit_is_stopped_at_its_hard_one(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    warned: list[bool] = []

    @app.task(soft_time_limit=0.2, time_limit=0.5)
    def stubborn() -> None:
        try:
            while True:
                pass
        except SoftTimeLimitExceeded:
            warned.append(True)
        while True:  # and carries on regardless
            pass

    with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
        handle = stubborn.delay()
        wait_for(lambda: app.dead_letters(), "the dead letter")
        drain(worker, raise_errors=False)
    assert warned == [True]
    assert [(e.id, e.reason) for e in app.dead_letters()] == [(handle.id, "time_limit")]
    events = [e["event"] for e in logs]
    assert events.index("task.soft_time_limit") < events.index("task.stopped")


def test_a_hard_limit_stops_a_coroutine_task(results_app: App) -> None:
    app = results_app

    @app.task(time_limit=0.3, max_retries=3)
    async def hang() -> None:
        await asyncio.sleep(3600)

    with running_worker(app) as worker:
        handle = hang.delay()
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=15)
        drain(worker, raise_errors=False)
    assert (failed.value.reason, failed.value.exc_type) == ("time_limit", "TimeLimitExceeded")
    assert [(e.id, e.reason) for e in app.dead_letters()] == [(handle.id, "time_limit")]


def test_a_coroutine_blocking_the_loop_past_its_hard_limit_gets_the_loop_replaced(
    make_app: Callable[..., App], blocker: threading.Event
) -> None:
    app = make_app(backend="memory://", loop_block_threshold=0.1)
    started = threading.Event()

    @app.task(time_limit=0.3)
    async def block() -> None:
        started.set()
        blocker.wait(3600)  # holds the loop: no cancellation reaches it

    @app.task(retry_backoff=0)
    async def echo(x: int) -> int:
        return x

    with running_worker(app, concurrency=2) as worker:
        stuck = block.delay()
        wait_for(started.is_set, "the blocking task to start")
        waiting = echo.delay(1)  # submitted to the blocked loop
        with pytest.raises(TaskFailed) as failed:
            stuck.get(timeout=15)
        # The task waiting on the blocked loop is retried, on a new loop
        assert waiting.get(timeout=15) == 1
        assert echo.delay(2).get(timeout=15) == 2
        drain(worker, raise_errors=False)
    assert failed.value.reason == "time_limit"
    assert [(e.id, e.reason) for e in app.dead_letters()] == [(stuck.id, "time_limit")]


def test_a_coroutine_that_ignores_its_cancellation_counts_as_abandoned(
    make_app: Callable[..., App], blocker: threading.Event
) -> None:
    app = make_app(max_abandoned_threads=0)

    @app.task(time_limit=0.2)
    async def stubborn() -> None:
        while not blocker.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # the mistake: it runs on

    with running_worker(app) as worker:
        handle = stubborn.delay()
        wait_for(worker.recycle.is_set, "the recycle flag")
        blocker.set()
        drain(worker, raise_errors=False)
    assert [(e.id, e.reason) for e in app.dead_letters()] == [(handle.id, "time_limit")]


def test_a_coroutine_still_running_when_the_worker_stops_is_not_settled(
    broker_url: str, make_app: Callable[..., App]
) -> None:
    """As for a thread: its message goes back to the broker, neither acked nor dead-lettered."""
    app = make_app(broker_url)
    started = threading.Event()

    @app.task
    async def slow() -> None:
        started.set()
        await asyncio.sleep(3600)

    worker = Worker(app, concurrency=1, shutdown_timeout=0.2)
    worker.start()
    slow.delay()
    wait_for(started.is_set, "the task to start")
    assert worker.stop() is False
    assert app.dead_letters() == []
    spec = app.queue(app.settings.default_queue)
    wait_for(lambda: app.transport.message_counts([spec])[spec.name] == 1, "the message back")


def test_threads_past_their_hard_limit_piling_up_set_the_recycle_flag(
    make_app: Callable[..., App], blocker: threading.Event
) -> None:
    app = make_app(max_abandoned_threads=1)

    @app.task(time_limit=0.2)
    def hang() -> None:
        blocker.wait(3600)

    with structlog.testing.capture_logs() as logs, running_worker(app, concurrency=2) as worker:
        hang.delay()
        wait_for(lambda: len(app.dead_letters()) == 1, "the first dead letter")
        wait_for(lambda: worker._pool.abandoned_alive() == 1, "one thread given up")
        assert not worker.recycle.is_set()  # one is tolerated
        hang.delay()
        wait_for(worker.recycle.is_set, "the recycle flag")
    assert worker.recycle_reason is not None and "max_abandoned_threads=1" in worker.recycle_reason
    assert [e["event"] for e in logs].count("worker.recycle") == 1
    assert {e.reason for e in app.dead_letters()} == {"time_limit"}


# -- terminate and resize ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["thread", "coroutine"])
def test_terminate_stops_a_running_task_and_dead_letters_it_with_the_reason(
    results_app: App, blocker: threading.Event, kind: str
) -> None:
    app = results_app
    started = threading.Event()

    if kind == "thread":

        @app.task(name="hang")
        def hang() -> None:
            started.set()
            blocker.wait(3600)

    else:

        @app.task(name="hang")
        async def hang() -> None:
            started.set()
            await asyncio.sleep(3600)

    task = app.tasks["hang"]
    with running_worker(app) as worker:
        assert worker.terminate("no-such-task") is False
        handle = task.delay()
        wait_for(started.is_set, "the task to start")
        assert worker.terminate(handle.id, reason="revoked") is True
        assert worker.terminate(handle.id) is False  # stopped already
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=15)
        drain(worker, raise_errors=False)
    assert (failed.value.reason, failed.value.exc_type) == ("revoked", "TaskTerminated")
    assert [(e.id, e.reason) for e in app.dead_letters()] == [(handle.id, "revoked")]


def test_resize_grows_and_shrinks_the_pool_and_prefetch_follows(
    make_app: Callable[..., App],
) -> None:
    app = make_app()

    @app.task
    def noop() -> None: ...

    with running_worker(app, concurrency=2) as worker:
        worker.resize(4)
        assert (worker.concurrency, worker.prefetch, len(worker._pool)) == (4, 8, 4)
        worker.resize(0)  # never below 1
        assert (worker.concurrency, worker.prefetch) == (1, 2)
        wait_for(lambda: len(worker._pool) == 1, "the surplus threads to exit")
        noop.delay()
        drain(worker)
    explicit = make_app()
    with running_worker(explicit, concurrency=2, prefetch=10) as worker:
        worker.resize(3)
        assert (worker.concurrency, worker.prefetch) == (3, 10)  # a given prefetch stays


# -- start-up checks --------------------------------------------------------------------------


def test_limits_are_checked_at_decoration(make_app: Callable[..., App]) -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match=r"Task 'bad': soft_time_limit \(5 s\) is above"):
        app.task(name="bad", soft_time_limit=5, time_limit=2)(lambda: None)
    for wrong in (0, -1, "ten", True):
        with pytest.raises(ConfigurationError, match="Task 'bad': time_limit must be positive"):
            app.task(name="bad", time_limit=wrong)(lambda: None)
    task = app.task(name="good", soft_time_limit=timedelta(seconds=1), time_limit=2)(lambda: None)
    assert (task.soft_time_limit, task.time_limit) == (1.0, 2.0)


def test_the_app_s_defaults_apply_to_tasks_that_set_none(make_app: Callable[..., App]) -> None:
    app = make_app(soft_time_limit=10, time_limit=20)
    default = app.task(name="default")(lambda: None)
    own = app.task(name="own", time_limit=60)(lambda: None)
    assert (default.soft_time_limit, default.time_limit) == (10, 20)
    assert (own.soft_time_limit, own.time_limit) == (10, 60)
    with pytest.raises(ConfigurationError, match="the app's defaults"):
        app.task(name="short", time_limit=5)(lambda: None)  # below the default soft limit


def test_a_hard_limit_above_the_redis_visibility_timeout_is_refused(
    make_app: Callable[..., App],
) -> None:
    url = REDIS_URL.replace("redis://", "redis+kombu://", 1)
    app = make_app(url, transport_options={"visibility_timeout": 600})
    app.task(name="fits", time_limit=300, max_retries=0)(lambda: None)
    check_app(app)
    app.task(name="long", time_limit=900, max_retries=0)(lambda: None)
    with pytest.raises(ConfigurationError) as refused:
        check_app(app)
    assert "task 'long': time_limit is 900 s, above the broker's visibility_timeout" in str(
        refused.value
    )


def test_a_hard_limit_above_rabbitmq_s_consumer_timeout_is_refused(
    make_app: Callable[..., App],
) -> None:
    app = make_app("amqp://guest:guest@127.0.0.1:5672//")
    app.task(name="long", time_limit=3600)(lambda: None)
    with pytest.raises(ConfigurationError, match=r"above the broker's consumer_timeout \(1800 s\)"):
        check_app(app)
    # A broker whose consumer_timeout was raised says so in the transport options.
    raised = make_app(
        "amqp://guest:guest@127.0.0.1:5672//", transport_options={"consumer_timeout": 7200}
    )
    raised.task(name="long", time_limit=3600)(lambda: None)
    check_app(raised)


# -- process mode ------------------------------------------------------------------------------


@pytest.mark.integration
def test_hung_tasks_in_worker_processes_are_dead_lettered_and_the_others_still_run(
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("amqp")
    add_hung_tasks(s.app)
    parent = run_cli(
        s, "--processes", "2", "-c", "1", "--shutdown-timeout", "5", app="tests.timelimit_app"
    )
    parent.wait_started(2)

    # When a task blocked in C and one looping in Python run past their hard limit
    hang = s.app.tasks[HANG].delay()
    spin = s.app.tasks[SPIN].delay()

    # Then both are dead-lettered with reason time_limit
    wait_for(lambda: len(s.app.dead_letters()) == 2, "two dead letters")
    assert {(e.id, e.reason) for e in s.app.dead_letters()} == {
        (hang.id, "time_limit"),
        (spin.id, "time_limit"),
    }
    # And the blocked thread, which nothing can stop, makes its child ask to be replaced
    [recycle] = parent.wait_log("worker.recycle")
    assert "max_abandoned_threads=0" in recycle["reason"]
    # While the workers go on serving the other tasks
    for i in range(10):
        s.send(f"after{i}")
    wait_for(lambda: len(s.record.tags(prefix="after")) == 10, "10 finished tasks")
    parent.signal(signal.SIGTERM)
    parent.wait(20)


@pytest.mark.integration
def test_a_child_with_a_thread_past_its_hard_limit_is_replaced(
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("amqp")
    add_hung_tasks(s.app)
    parent = run_cli(
        s, "--processes", "2", "-c", "1", "--shutdown-timeout", "2", app="tests.timelimit_app"
    )
    parent.wait_started(2)
    s.app.tasks[HANG].delay()
    wait_for(lambda: len(s.app.dead_letters()) == 1, "the dead letter")
    # Then the child that ran it exits with RET_RECYCLE and is replaced at once
    [recycled] = parent.wait_log("supervisor.child_recycled", timeout=15)
    assert recycled["pid"] in started_children(parent)
    assert not parent.logs("supervisor.child_died")
    parent.wait_started(3)  # its replacement
    s.send("after")
    wait_for(lambda: s.record.tags(prefix="after"), "a task run after the replacement")
    parent.signal(signal.SIGTERM)
    assert parent.wait(20) == 0
