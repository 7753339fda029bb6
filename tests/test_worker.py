"""Worker behaviour on the memory transport: configuration checks, hooks, testing helpers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest
import structlog

from mqtasks import App, ConfigurationError, Message, Middleware, Worker
from mqtasks.exceptions import SkipMessage
from mqtasks.middleware import Retries
from mqtasks.testing import drain, memory_app, reset, running_worker


@pytest.fixture
def app():
    app = memory_app()
    yield app
    reset(app)


def test_prefetch_below_concurrency_is_a_configuration_error(app: App) -> None:
    with pytest.raises(ConfigurationError, match=r"prefetch \(2\) is below concurrency \(4\)"):
        Worker(app, concurrency=4, prefetch=2)


def test_default_prefetch_is_twice_the_concurrency(app: App) -> None:
    assert Worker(app, concurrency=3).prefetch == 6


def test_drain_times_out_with_what_is_left(app: App) -> None:
    gate = threading.Event()

    @app.task
    def stuck() -> None:
        gate.wait(10)

    stuck.delay()
    with running_worker(app) as worker:
        with pytest.raises(TimeoutError, match="running=1"):
            drain(worker, timeout=0.3)
        gate.set()
        drain(worker)


def test_failed_task_is_logged_with_its_traceback(app: App) -> None:
    @app.task(max_retries=0)
    def boom(n: int) -> None:
        raise KeyError(n)

    handle = boom.delay(7)
    with (
        structlog.testing.capture_logs() as logs,
        running_worker(app) as worker,
        pytest.raises(KeyError),
    ):
        drain(worker)
    failed = [e for e in logs if e["event"] == "task.failed"]
    assert len(failed) == 1
    assert failed[0]["task_id"] == handle.id
    assert failed[0]["error"] == "KeyError: 7"
    assert "raise KeyError(n)" in failed[0]["traceback"]
    assert failed[0]["log_level"] == "error"


class Recorder(Middleware):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def before_publish(self, app: App, message: Message) -> Message:
        self.calls.append(f"{self.name}.before_publish")
        return message.copy(headers={**message.headers, f"x-{self.name}": "1"})

    def after_publish(self, app: App, message: Message) -> None:
        self.calls.append(f"{self.name}.after_publish")

    def before_process(self, worker: Worker, message: Message) -> None:
        self.calls.append(f"{self.name}.before_process:{sorted(message.headers)}")

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self.calls.append(f"{self.name}.after_process:{result}")


def test_middleware_hooks_run_in_order_and_after_hooks_in_reverse() -> None:
    calls: list[str] = []
    app = memory_app(middleware=[Recorder("a", calls), Recorder("b", calls)])

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(1, 2)
    with running_worker(app) as worker:
        drain(worker)
    reset(app)
    assert calls == [
        "a.before_publish",
        "b.before_publish",
        "b.after_publish",
        "a.after_publish",
        "a.before_process:['x-a', 'x-b']",
        "b.before_process:['x-a', 'x-b']",
        "b.after_process:3",
        "a.after_process:3",
    ]


class Broken(Middleware):
    def before_process(self, worker: Worker, message: Message) -> None:
        raise RuntimeError("observability bug")


class Skipper(Middleware):
    def before_process(self, worker: Worker, message: Message) -> None:
        raise SkipMessage()


def test_a_broken_hook_never_fails_the_task() -> None:
    app = memory_app(middleware=[Broken()])
    ran: list[int] = []

    @app.task
    def f() -> None:
        ran.append(1)

    f.delay()
    with running_worker(app) as worker:
        drain(worker)
    reset(app)
    assert ran == [1]


def test_skip_message_acks_without_running() -> None:
    app = memory_app(middleware=[Skipper()])
    ran: list[int] = []

    @app.task
    def f() -> None:
        ran.append(1)

    f.delay()
    with running_worker(app) as worker:
        drain(worker)
        assert worker.settled == 1
    reset(app)
    assert ran == []


def test_memory_apps_are_isolated() -> None:
    one, two = memory_app(default_queue="same"), memory_app(default_queue="same")

    @one.task(name="t")
    def t1() -> None: ...

    t1.delay()
    assert one.transport.message_counts([one.queue("same")]) == {"same": 1}
    assert two.transport.message_counts([two.queue("same")]) == {"same": 0}
    reset(one)
    assert one.transport.message_counts([one.queue("same")]) == {"same": 0}


def test_pytest_fixtures_give_an_app_and_a_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from mqtasks.testing import drain

        def test_it(mqtasks_app, request):
            seen = []

            @mqtasks_app.task
            def add(x, y):
                seen.append(x + y)

            worker = request.getfixturevalue("mqtasks_worker")
            add.delay(2, 3)
            drain(worker)
            assert seen == [5]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_stop_is_idempotent_and_safe_before_start(app: App) -> None:
    worker = Worker(app, concurrency=1)
    assert worker.stop() is True
    worker.start()
    assert worker.stop() is True
    assert worker.stop() is True


class Pending:
    """An awaitable that is not a coroutine (as an asyncio future is)."""

    def __await__(self) -> Generator[None, None, None]:
        yield


class Handler:
    """A callable object whose (plain) ``__call__`` returns a coroutine."""

    def __init__(self, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.body = body

    def __call__(self) -> Coroutine[Any, Any, None]:
        return self.body()


@pytest.mark.parametrize("kind", ["coroutine", "callable_object", "awaitable"])
def test_a_task_returning_a_coroutine_has_it_run_on_the_event_loop(app: App, kind: str) -> None:
    """A plain function that returns an awaitable: the worker awaits it, as an async def's."""
    ran: list[int] = []

    async def body() -> None:
        ran.append(1)

    def sneaky() -> Any:
        return body()

    functions: dict[str, Callable[[], Any]] = {
        "coroutine": sneaky,
        "callable_object": Handler(body),
        "awaitable": Pending,
    }
    fn = functions[kind]
    task = app.task(name=f"sneaky_{kind}", max_retries=3)(fn)
    task.delay()
    with running_worker(app) as worker:
        drain(worker)
    assert ran == ([] if kind == "awaitable" else [1])
    assert app.dead_letters() == []


def test_failed_tasks_are_retried_and_dead_lettered_with_no_middleware_installed() -> None:
    """The decision is middleware, yet ``middleware=[]`` never turns it off."""
    app = memory_app(middleware=[])
    runs: list[int] = []

    @app.task(max_retries=1, retry_backoff=0)
    def boom() -> None:
        runs.append(1)
        raise RuntimeError("no")

    handle = boom.delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    [entry] = app.dead_letters()
    reset(app)
    assert (entry.id, entry.reason, entry.attempts) == (handle.id, "max_retries_exceeded", 2)
    assert len(runs) == 2
    assert app.middleware == []


class NoRetries(Retries):
    """Gives up at the first failure."""

    def retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        worker.dead_letter(message, "no_retries", "retries are off here", exception)


def test_a_retries_middleware_the_app_installs_makes_the_decision(app: App) -> None:
    app.middleware.append(NoRetries())
    runs: list[int] = []

    @app.task(max_retries=3, retry_backoff=0)
    def boom() -> None:
        runs.append(1)
        raise RuntimeError("no")

    boom.delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    [entry] = app.dead_letters()
    assert (entry.reason, entry.detail) == ("no_retries", "retries are off here")
    assert runs == [1]


class FailsOnce(Retries):
    """A deciding hook with a bug the first time it runs."""

    def __init__(self) -> None:
        self.calls = 0

    def after_process(self, worker: Worker, message: Message, **outcome: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("bug in the deciding middleware")
        super().after_process(worker, message, **outcome)


def test_a_failure_no_middleware_decides_is_requeued_not_acked(app: App) -> None:
    app.middleware.append(FailsOnce())
    runs: list[int] = []

    @app.task(max_retries=0)
    def boom() -> None:
        runs.append(1)
        raise RuntimeError("no")

    boom.delay()
    with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
        drain(worker, raise_errors=False)
    events = [e["event"] for e in logs]
    assert events.count("middleware.hook_failed") == 1
    assert events.count("task.undecided") == 1
    # Requeued, it ran again and was dead-lettered by the (now working) decision.
    assert runs == [1, 1]
    assert [e.reason for e in app.dead_letters()] == ["max_retries_exceeded"]


def test_retry_and_dead_letter_are_only_for_a_message_being_processed(app: App) -> None:
    worker = Worker(app, concurrency=1)
    message = Message(id="m-1", task="t", queue=app.settings.default_queue)
    with pytest.raises(RuntimeError, match="after_process"):
        worker.dead_letter(message, "rejected", "no")
    with pytest.raises(RuntimeError, match="after_process"):
        worker.retry(message, message.copy(attempt=2), 1.0, RuntimeError("no"))
    assert not worker.decided
