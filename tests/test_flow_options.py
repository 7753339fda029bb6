"""Flow-control options are checked when a task is defined (mqtasks.flow.options)."""

from __future__ import annotations

from typing import Any

import pytest

from mqtasks import App, BatchFailures, CircuitBreaker, ConfigurationError
from mqtasks.flow import Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1)),
        ("10/m", Rate(10, 60)),
        ("5/h", Rate(5, 3600)),
        ("30/10s", Rate(30, 10)),
        (" 2.5 / min ", Rate(2.5, 60)),
    ],
)
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["100", "0/s", "10/d", "fast", "-1/s", ""])
def test_a_bad_rate_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate"):
        parse_rate(text)


def _app(**kwargs: Any) -> App:
    return App("flow", "memory://", **kwargs)


def test_options_are_read_into_task_flow() -> None:
    app = _app(backend="memory://", circuits=[CircuitBreaker("payments")])

    @app.task(rate_limit="10/s", rate_key="user_id", concurrency_limit=2, circuit="payments")
    def notify(user_id: int) -> None: ...

    @app.task(batch_size=50)
    def index(docs: list[dict[str, Any]]) -> None: ...

    assert notify.flow.rate_limit == Rate(10, 1)
    assert notify.flow.rate_key == "user_id"
    assert notify.flow.concurrency_limit == 2
    assert notify.flow.circuit == "payments"
    assert notify.flow.limited and not notify.flow.batched
    assert index.flow.batch_size == 50 and index.flow.batch_wait == 1.0


@pytest.mark.parametrize("option", [{"rate_limit": "1/s"}, {"concurrency_limit": 1}])
def test_limits_without_a_backend_are_refused(option: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="MQTASKS_BACKEND_URL"):
        _app().task(**option)(lambda: None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rate_key": "user_id"}, "needs a rate_limit"),
        ({"rate_limit": "1/s", "rate_key": "nope"}, "not a parameter"),
        ({"concurrency_limit": 0}, "whole number"),
        ({"concurrency_limit": True}, "whole number"),
        ({"circuit": "unknown"}, "not a circuit of the app"),
        ({"batch_wait": 1.0}, "needs a batch_size"),
    ],
)
def test_bad_options_are_refused_at_definition(options: dict[str, Any], match: str) -> None:
    app = _app(backend="memory://")
    with pytest.raises(ConfigurationError, match=match):

        @app.task(**options)
        def notify(user_id: int) -> None: ...


def test_a_batch_function_must_take_one_list() -> None:
    app = _app()
    with pytest.raises(ConfigurationError, match="one required positional"):

        @app.task(batch_size=10)
        def two(a: list[int], b: int) -> None: ...

    with pytest.raises(ConfigurationError, match="positive seconds"):

        @app.task(batch_size=10, batch_wait=0)
        def one(items: list[int]) -> None: ...


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bad name"}, "letters"),
        ({"name": "p", "failure_threshold": 0}, "failure_threshold"),
        ({"name": "p", "window": 0}, "window"),
        ({"name": "p", "reset_timeout": -1}, "reset_timeout"),
        ({"name": "p", "trip_on": ("x",)}, "exception types"),
    ],
)
def test_bad_circuit_declarations_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        CircuitBreaker(**kwargs)


def test_two_circuits_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="Two circuit breakers"):
        _app(circuits=[CircuitBreaker("p"), CircuitBreaker("p")])


def test_batch_failures_names_the_failed_items() -> None:
    exc = BatchFailures({3: ValueError("x"), 0: KeyError("k")})
    assert exc.failures[3].args == ("x",)
    assert "2 item(s)" in str(exc) and "0: KeyError" in str(exc)


def test_a_batch_task_is_refused_as_a_workflow_step() -> None:
    app = _app()

    @app.task(batch_size=10)
    def index(docs: list[int]) -> None: ...

    for make in (index.s, index.si):
        with pytest.raises(ConfigurationError, match="delay\\(item\\)"):
            make(1)
