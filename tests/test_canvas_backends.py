"""Workflows on the real brokers (RabbitMQ, Redis) with each real result backend (Redis,
PostgreSQL): chain, group and chord run by an in-process worker, each test under a key
prefix or table prefix of its own (deleted afterwards).

The tasks count their runs in the test process, so a test sees how often a chord's
callback or errback ran, not only what was stored.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mqtasks import App, TaskFailed, current_message
from mqtasks.canvas import chain, chord, group
from mqtasks.task import Task
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests._helpers.wait import wait_for
from tests.backend.conftest import drop_tables, postgres_url, table_prefix

pytestmark = pytest.mark.integration

#: Seconds a workflow may take before the test fails (they take well under one).
WAIT = 15.0


@dataclass
class Flow:
    """An app with a result backend, and tasks that count their runs (thread-safe)."""

    app: App
    runs: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    boomed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    add: Task[Any, int] = field(init=False)
    tsum: Task[Any, int] = field(init=False)
    boom: Task[Any, int] = field(init=False)
    errback: Task[Any, None] = field(init=False)

    def __post_init__(self) -> None:
        app = self.app

        def count(name: str) -> None:
            with self.lock:
                self.runs[name] += 1

        @app.task(name="wfb.add")
        def add(x: int, y: int) -> int:
            count("add")
            return x + y

        @app.task(name="wfb.tsum")
        def tsum(values: list[int]) -> int:
            count("tsum")
            return sum(values)

        @app.task(name="wfb.boom", max_retries=0)
        def boom(x: int) -> int:
            count("boom")
            message = current_message()
            assert message is not None
            with self.lock:
                self.boomed.append(message.id)
            raise RuntimeError(f"boom {x}")

        @app.task(name="wfb.errback")
        def errback(task_id: str, error: dict[str, Any]) -> None:
            count("errback")
            with self.lock:
                self.errors.append((task_id, error))

        self.add, self.tsum, self.boom, self.errback = add, tsum, boom, errback

    def run_count(self, name: str) -> int:
        """How often task ``name`` has run so far."""
        with self.lock:
            return self.runs[name]


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest) -> str:
    """The local RabbitMQ, then the local Redis."""
    return require_broker(request.param)


@pytest.fixture(params=["redis", "postgresql"])
def backend_options(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """App arguments for the local Redis, then the local PostgreSQL, as result backend;
    the test's keys or tables are deleted after it."""
    if request.param == "redis":
        require_broker("redis")
        prefix = "{" + unique_name("wfb") + "}:"
        try:
            yield {"backend": REDIS_URL, "backend_key_prefix": prefix}
        finally:
            delete_keys(prefix)
    else:
        prefix = table_prefix()
        try:
            yield {"backend": postgres_url(prefix)}
        finally:
            drop_tables(prefix)


@pytest.fixture
def flow(
    broker: str, backend_options: dict[str, Any], make_app: Callable[..., App]
) -> Iterator[Flow]:
    """A Flow on each broker with each backend; its connections closed before cleanup."""
    app = make_app(broker, **backend_options)
    try:
        yield Flow(app)
    finally:
        app.close()


def test_chain_passes_each_value_to_the_next_step(flow: Flow) -> None:
    with running_worker(flow.app):
        handle = chain(flow.add.s(1, 2), flow.add.s(3), flow.add.s(4)).delay()
        assert handle.get(timeout=WAIT) == 10
    assert [h.get(timeout=1) for h in handle.steps] == [3, 6, 10]
    assert flow.run_count("add") == 3


def test_group_of_20_returns_values_in_order(flow: Flow) -> None:
    with running_worker(flow.app, concurrency=4):
        handle = group(flow.add.s(i, i) for i in range(20)).delay()
        assert handle.get(timeout=WAIT) == [2 * i for i in range(20)]
    assert handle.states == ["SUCCEEDED"] * 20
    assert flow.run_count("add") == 20


def test_chord_of_50_runs_its_callback_once_with_the_sum(flow: Flow) -> None:
    with running_worker(flow.app, concurrency=4) as worker:
        handle = chord((flow.add.s(i, i) for i in range(50)), flow.tsum.s()).delay()
        assert handle.get(timeout=WAIT) == 2 * sum(range(50))
        # A second run of the callback, had one been sent, would happen before the queue empties
        drain(worker, WAIT)
    assert flow.run_count("add") == 50
    assert flow.run_count("tsum") == 1


def test_chord_with_a_failing_member_runs_its_errback_never_its_callback(flow: Flow) -> None:
    # Given a chord whose third member always fails (max_retries=0)
    members = [flow.add.s(1, 1), flow.add.s(2, 2), flow.boom.s(3), flow.add.s(4, 4)]
    workflow = chord(members, flow.tsum.s()).on_error(flow.errback.s())
    with running_worker(flow.app) as worker:
        handle = workflow.delay()
        # When the chord's result is read
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(
            lambda: flow.run_count("errback") and flow.run_count("add") == 3,
            lambda: f"the errback and every member; runs {dict(flow.runs)}",
            timeout=WAIT,
        )
        drain(worker, WAIT, raise_errors=False)
        worker.errors.clear()
    # Then it names the failing member; the errback ran once for it, the callback never
    (member,) = flow.boomed
    assert failed.value.task_id == member
    assert "RuntimeError" in str(failed.value) and member in str(failed.value)
    assert flow.app.handle(member).state == "DEAD_LETTERED"
    assert flow.run_count("boom") == 1
    assert flow.run_count("tsum") == 0
    assert flow.run_count("errback") == 1
    ((task_id, error),) = flow.errors
    assert task_id == member
    assert error["type"] == "RuntimeError" and error["message"] == "boom 3"


def test_chain_whose_middle_step_fails_names_that_step(flow: Flow) -> None:
    # Given a chain whose second step always fails (max_retries=0)
    workflow = chain(flow.add.s(1, 2), flow.boom.s(), flow.add.s(4))
    with running_worker(flow.app) as worker:
        handle = workflow.delay()
        # When the chain's result is read
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        drain(worker, WAIT, raise_errors=False)
        worker.errors.clear()
    # Then it names the failed step, and the last step never ran
    step2 = handle.steps[1].id
    assert failed.value.task_id == step2
    assert failed.value.exc_type == "RuntimeError" and failed.value.exc_message == "boom 3"
    assert step2 in str(failed.value)
    assert flow.run_count("add") == 1 and flow.run_count("boom") == 1
    assert handle.steps[1].state == "DEAD_LETTERED"
    assert handle.steps[2].state == "FAILED"
