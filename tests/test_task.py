"""Tasks: registration, local calls, and what delay() checks in the caller."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mqtasks import App, ConfigurationError, DuplicateTask, EncodeError, Task, TaskNotRegistered


@pytest.fixture
def app() -> App:
    return App("shop", broker="memory://", default_queue="work")


def test_decorator_with_and_without_parentheses(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="emails.send", queue="emails", priority=5)
    def send(user_id: int) -> None: ...

    assert isinstance(add, Task)
    assert add.name == f"{__name__}.test_decorator_with_and_without_parentheses.<locals>.add"
    assert add.queue == "work"
    assert (send.name, send.queue, send.priority) == ("emails.send", "emails", 5)
    assert app.get_task("emails.send") is send
    assert app.task_queues() == ["work", "emails"]


def test_calling_a_task_runs_it_here(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add(2, 3) == 5
    assert app.transport.message_counts([app.queue("work")]) == {"work": 0}


def test_delay_publishes_and_returns_the_id(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(2, 3)
    assert handle.task == add.name and handle.queue == "work"
    assert len(handle.id) == 36
    assert app.transport.message_counts([app.queue("work")]) == {"work": 1}


def test_wrong_arguments_fail_in_the_caller(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="wrong arguments"):
        add.delay(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        add.apply_async(args=(1, 2), kwargs={"z": 3})
    assert app.transport.message_counts([app.queue("work")]) == {"work": 0}


def test_non_json_argument_is_named(app: App) -> None:
    @app.task
    def remind(user_id: int, when: object) -> None: ...

    with pytest.raises(EncodeError, match="Argument 'when' of task") as info:
        remind.delay(1, datetime.now(timezone.utc))
    assert info.value.argument == "when"


def test_non_json_keyword_argument_is_named(app: App) -> None:
    @app.task
    def tag(user_id: int, **tags: object) -> None: ...

    with pytest.raises(EncodeError, match="Argument 'colours'"):
        tag.delay(1, colours={"red", "blue"})


def test_nan_is_not_json(app: App) -> None:
    @app.task
    def f(x: float) -> None: ...

    with pytest.raises(EncodeError, match="Argument 'x'"):
        f.delay(float("nan"))


def test_oversized_arguments_are_refused_before_publishing(app: App) -> None:
    small = App("s", broker="memory://", max_message_size=1000, default_queue="work")

    @small.task
    def upload(data: str) -> None: ...

    with pytest.raises(EncodeError, match="over the 1000-byte limit"):
        upload.delay("x" * 1000)
    assert small.transport.message_counts([small.queue("work")]) == {"work": 0}
    upload.delay("x" * 900)


def test_apply_async_options_reach_the_message(app: App) -> None:
    @app.task(expires=60)
    def add(x: int, y: int) -> int:
        return x + y

    message = add.message(
        (1,), {"y": 2}, queue="other", priority=7, headers={"traceparent": "00-ab"}, task_id="t-1"
    )
    assert (message.id, message.queue, message.priority) == ("t-1", "other", 7)
    assert message.args == (1,) and dict(message.kwargs) == {"y": 2}
    assert message.headers == {"traceparent": "00-ab"}
    assert message.expires_at is not None
    remaining = message.expires_at - datetime.now(timezone.utc)
    assert timedelta(seconds=55) < remaining <= timedelta(seconds=60)
    handle = add.apply_async(args=(1, 2), queue="other", task_id="t-2", expires=timedelta(hours=1))
    assert (handle.id, handle.queue) == ("t-2", "other")


def test_reserved_headers_and_bad_priorities_are_refused(app: App) -> None:
    @app.task
    def f() -> None: ...

    with pytest.raises(ValueError, match="reserved"):
        f.apply_async(headers={"mqtasks-attempt": 5})
    with pytest.raises(ValueError, match="priority"):
        f.apply_async(priority=300)
    with pytest.raises(ConfigurationError, match="aware"):
        f.apply_async(expires=datetime(2030, 1, 1))


def test_unknown_task_option_fails_at_decoration(app: App) -> None:
    with pytest.raises(ConfigurationError, match="Did you forget to add a middleware"):

        @app.task(max_retriez=3)
        def f() -> None: ...


def test_two_functions_cannot_share_a_name(app: App) -> None:
    @app.task(name="dup")
    def one() -> None: ...

    with pytest.raises(DuplicateTask, match="'dup'"):

        @app.task(name="dup")
        def two() -> None: ...


def test_unknown_task_lookup_lists_registered(app: App) -> None:
    @app.task(name="known")
    def f() -> None: ...

    with pytest.raises(TaskNotRegistered, match="registered: known"):
        app.get_task("nope")


@pytest.mark.parametrize(
    ("args", "kwargs", "fits"),
    [
        ((1,), {}, True),
        ((1, 2), {}, True),
        ((), {"a": 1}, True),
        ((), {}, False),
        ((1, 2, 3), {}, False),
        ((1,), {"a": 1}, False),
        ((1,), {"c": 1}, False),
    ],
)
def test_check_arguments_agrees_with_signature_bind(
    app: App, args: tuple[int, ...], kwargs: dict[str, int], fits: bool
) -> None:
    @app.task
    def plain(a: int, b: int = 0) -> None: ...

    @app.task
    def keyword_only(a: int, b: int = 0, *, c: int) -> None: ...

    if fits:
        plain.check_arguments(args, kwargs)
    else:
        with pytest.raises(TypeError):
            plain.check_arguments(args, kwargs)
    # A required keyword-only parameter is never satisfied by positional arguments.
    with pytest.raises(TypeError):
        keyword_only.check_arguments(args, {k: v for k, v in kwargs.items() if k != "c"})


async def fetch(url: str) -> str:
    return url


async def stream(n: int) -> Any:
    yield n


class AsyncCallable:
    async def __call__(self, n: int) -> int:
        return n


@pytest.mark.parametrize("fn", [fetch, AsyncCallable()], ids=["coroutine", "object"])
def test_an_async_def_function_or_object_is_a_coroutine_task(
    app: App, fn: Callable[..., Any]
) -> None:
    """The worker runs it on its event loop (tests/test_async.py)."""
    task = app.task(name="fetch", queue="io")(fn)
    assert task.is_async and app.tasks == {"fetch": task}


def test_a_plain_function_is_not_a_coroutine_task(app: App) -> None:
    assert not app.task(name="plain")(lambda: None).is_async


def test_an_async_generator_is_refused_at_decoration(app: App) -> None:
    """A task returns one value: nothing would iterate over what it yields."""
    with pytest.raises(ConfigurationError, match="is an async generator function"):
        app.task(stream)
    assert app.tasks == {}
