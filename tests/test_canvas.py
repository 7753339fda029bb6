"""Workflows: chain, group and chord run by real workers, on memory://, RabbitMQ and Redis.

On memory:// the result backend is memory://; on the real brokers it is the
local Redis, under a key prefix of the test's own (deleted afterwards).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mqtasks import App, ConfigurationError, Message, Middleware, TaskFailed
from mqtasks.canvas import Chain, ChainHandle, Signature, chain, chord, group
from mqtasks.exceptions import MiddlewareError
from mqtasks.middleware.workflow import Workflow, chord_fired_key
from mqtasks.task import Task
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import REDIS_URL, unique_name
from tests._helpers.cli import ROOT
from tests._helpers.redis import delete_keys
from tests._helpers.wait import wait_for

WAIT = 30.0


class Published(Middleware):
    """Keeps every message the app published (the client's and its worker's)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    def after_publish(self, app: App, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def of(self, task: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.task == task]


@dataclass
class Flow:
    """An app with a result backend, the workflow middleware, and tasks that count their runs."""

    app: App
    lease_ttl: float = 3.0
    runs: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    published: Published = field(default_factory=Published)
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    add: Task[Any, int] = field(init=False)
    tsum: Task[Any, int] = field(init=False)
    boom: Task[Any, int] = field(init=False)
    errback: Task[Any, None] = field(init=False)
    gated: Task[Any, int] = field(init=False)
    short: Task[Any, int] = field(init=False)

    def __post_init__(self) -> None:
        app = self.app
        app.middleware.extend([self.published, Workflow(lease_ttl=self.lease_ttl, defer_delay=0.2)])

        def count(name: str) -> None:
            with self.lock:
                self.runs[name] += 1

        @app.task(name="wf.add")
        def add(x: int, y: int) -> int:
            count("add")
            return x + y

        @app.task(name="wf.tsum")
        def tsum(values: list[int], extra: int = 0) -> int:
            count("tsum")
            return sum(values) + extra

        @app.task(name="wf.boom", max_retries=0)
        def boom(x: int) -> int:
            count("boom")
            raise RuntimeError(f"boom {x}")

        @app.task(name="wf.errback")
        def errback(task_id: str, error: dict[str, Any]) -> None:
            count("errback")
            with self.lock:
                self.errors.append((task_id, error))

        @app.task(name="wf.gated")
        def gated(x: int) -> int:
            count("gated")
            assert self.gate.wait(WAIT), "the test never opened the gate"
            return x

        @app.task(name="wf.short", expires=0.2)
        def short(x: int) -> int:
            count("short")
            return x

        self.add, self.tsum, self.boom, self.errback, self.gated = add, tsum, boom, errback, gated
        self.short = short


@pytest.fixture
def flow(broker_url: str, make_app: Callable[..., App]) -> Iterator[Flow]:
    """A Flow on each broker in turn: memory:// with memory://, the real ones with Redis."""
    if broker_url == "memory://":
        yield Flow(make_app(broker_url, backend="memory://"))
        return
    prefix = "{" + unique_name("wf") + "}:"
    try:
        yield Flow(make_app(broker_url, backend=REDIS_URL, backend_key_prefix=prefix))
    finally:
        delete_keys(prefix)


@pytest.fixture
def memory_flow(make_app: Callable[..., App]) -> Flow:
    """A Flow on memory:// only (for what involves no broker behaviour)."""
    return Flow(make_app("memory://", backend="memory://"))


# -- chains ----------------------------------------------------------------------------


def test_chain_passes_each_value_to_the_next_step(flow: Flow) -> None:
    with running_worker(flow.app):
        handle = chain(flow.add.s(1, 2), flow.add.s(3), flow.add.s(4)).delay()
        assert handle.get(timeout=WAIT) == 10
    assert isinstance(handle, ChainHandle)
    assert [h.get(timeout=1) for h in handle.steps] == [3, 6, 10]
    assert handle.parent is not None and handle.parent.get(timeout=1) == 6
    assert flow.runs["add"] == 3


def test_si_step_ignores_the_previous_value(flow: Flow) -> None:
    with running_worker(flow.app):
        handle = (flow.add.s(1, 2) | flow.add.si(10, 20) | flow.add.s(5)).delay()
        assert handle.get(timeout=WAIT) == 35


def test_failing_chain_step_fails_the_chain_naming_it(flow: Flow) -> None:
    # Given a chain whose second step always fails, with an errback
    workflow = chain(flow.add.s(1, 2), flow.boom.s(), flow.add.s(4)).on_error(flow.errback.s())
    with running_worker(flow.app) as worker:
        handle = workflow.delay()
        # When the chain's result is read
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(lambda: flow.runs["errback"], "the errback")
        worker.errors.clear()
    # Then it names the failed step, the later step never ran, the errback ran once
    step2 = handle.steps[1].id
    assert failed.value.task_id == step2
    assert "RuntimeError" in str(failed.value) and step2 in str(failed.value)
    assert flow.runs["add"] == 1 and flow.runs["boom"] == 1
    assert flow.runs["errback"] == 1
    ((task_id, error),) = flow.errors
    assert task_id == step2
    assert error["type"] == "RuntimeError" and error["message"] == "boom 3"
    assert error["reason"] == "max_retries_exceeded"
    assert handle.steps[1].state == "DEAD_LETTERED"
    assert handle.steps[2].state == "FAILED"


def test_chain_sent_in_a_publishing_block_is_pending_until_confirmed(memory_flow: Flow) -> None:
    f = memory_flow
    with f.app.publishing():
        handle = chain(f.add.s(1, 2), f.add.s(3)).delay()
        assert handle.pending and not handle.confirmed
    assert handle.confirmed and handle.steps[0].confirmed
    with running_worker(f.app):
        assert handle.get(timeout=WAIT) == 6


def test_workflow_survives_a_worker_restart(flow: Flow) -> None:
    # Given a chain whose second step is held by the broker for a while
    handle = chain(flow.add.s(1, 2), flow.add.s(3).set(countdown=1.5), flow.add.s(4)).delay()
    # When a worker runs the first step, then stops
    with running_worker(flow.app):
        assert handle.steps[0].get(timeout=WAIT) == 3
    assert handle.steps[1].state == "PENDING"
    # Then another worker finishes the chain
    with running_worker(flow.app):
        assert handle.get(timeout=WAIT) == 10


class RefuseOnce(Middleware):
    """Vetoes the first publish of ``task``, as a broker that fails once would."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.refused: list[str] = []

    def before_publish(self, app: App, message: Message) -> Message:
        if message.task == self.task and not self.refused:
            self.refused.append(message.id)
            raise MiddlewareError("the broker is away")
        return message


def test_step_whose_continuation_cannot_be_sent_is_deferred_not_lost(memory_flow: Flow) -> None:
    # Given a chain whose second step's first publish fails
    f = memory_flow
    refuse = RefuseOnce("wf.tsum")
    f.app.middleware.insert(0, refuse)
    with running_worker(f.app):
        handle = chain(f.add.s(1, 2), f.tsum.si([4, 5])).delay()
        # Then the first step is deferred and handled again: the chain completes
        assert handle.get(timeout=WAIT) == 9
    assert refuse.refused == [handle.id]
    # And the first step ran once: its stored value was used the second time
    assert f.runs["add"] == 1 and f.runs["tsum"] == 1


def test_chain_step_refused_unrun_fails_the_chain(memory_flow: Flow) -> None:
    # Given a chain whose second step expires before the broker hands it over
    f = memory_flow
    workflow = chain(f.add.s(1, 2), f.short.s().set(countdown=0.5), f.add.s(1))
    with running_worker(f.app) as worker:
        handle = workflow.on_error(f.errback.s()).delay()
        # Then the chain fails naming it, and its errback runs
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(lambda: f.errors, "the errback")
        worker.errors.clear()
    assert failed.value.task_id == handle.steps[1].id
    assert failed.value.reason == "expired"
    assert f.runs["short"] == 0 and f.runs["add"] == 1
    assert f.errors[0][0] == handle.steps[1].id


def test_chain_ending_in_a_group_sends_the_value_to_every_member(flow: Flow) -> None:
    f = flow
    members = group([f.add.s(10), f.add.s(20), f.add.si(5, 5)])
    with running_worker(f.app):
        handle = chain(f.add.s(1, 2), f.add.s(0), members).delay()
        assert handle.get(timeout=WAIT) == [13, 23, 10]
        assert handle.parent is not None and handle.parent.get(timeout=1) == 3
        assert (f.add.s(2, 2) | group([f.add.s(1)])).delay().get(timeout=WAIT) == [5]


def test_chain_ending_in_a_group_fails_every_member_when_a_step_fails(memory_flow: Flow) -> None:
    f = memory_flow
    workflow = chain(f.boom.s(1), group([f.add.s(1), f.add.s(2)])).on_error(f.errback.s())
    with running_worker(f.app) as worker:
        handle = workflow.delay()
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(lambda: f.errors, "the errback")
        worker.errors.clear()
    assert handle.parent is not None
    assert failed.value.task_id == handle.parent.id
    assert handle.states == ["FAILED", "FAILED"]
    assert f.runs["add"] == 0 and f.runs["errback"] == 1


# -- groups ----------------------------------------------------------------------------


def test_group_of_100_returns_values_in_order(flow: Flow) -> None:
    with running_worker(flow.app, concurrency=4):
        handle = group(flow.add.s(i, i) for i in range(100)).delay()
        assert handle.get(timeout=WAIT) == [2 * i for i in range(100)]
    assert handle.ready() and handle.successful() and not handle.failed()
    assert handle.states == ["SUCCEEDED"] * 100


def test_group_with_a_failing_member_raises_for_it(memory_flow: Flow) -> None:
    f = memory_flow
    with running_worker(f.app) as worker:
        handle = group([f.add.s(1, 1), f.boom.s(7)]).delay()
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        worker.errors.clear()
    assert failed.value.task_id == handle.ids[1]
    values = handle.get(timeout=1, propagate=False)
    assert values[0] == 2 and isinstance(values[1], TaskFailed)
    assert handle.failed() and not handle.successful()


def test_group_of_chains_and_a_chord_with_a_chain_member(memory_flow: Flow) -> None:
    f = memory_flow
    with running_worker(f.app):
        items: list[Signature[int] | Chain[int]] = [chain(f.add.s(1, 1), f.add.s(1)), f.add.s(2, 2)]
        assert group(items).delay().get(timeout=WAIT) == [3, 4]
        items = [chain(f.add.s(1, 1), f.add.s(10)), f.add.s(5, 5)]
        workflow = chord(items, f.tsum.s(100))
        assert workflow.delay().get(timeout=WAIT) == 12 + 10 + 100


# -- chords ----------------------------------------------------------------------------


def test_chord_of_100_runs_its_callback_once_with_every_value(flow: Flow) -> None:
    with running_worker(flow.app, concurrency=4):
        handle = chord((flow.add.s(i, i) for i in range(100)), flow.tsum.s()).delay()
        assert handle.get(timeout=WAIT) == 9900
    assert flow.runs["tsum"] == 1 and flow.runs["add"] == 100


def test_chord_with_a_failing_member_never_runs_its_callback(flow: Flow) -> None:
    # Given a chord whose third member always fails
    members = [flow.add.s(1, 1), flow.add.s(2, 2), flow.boom.s(3), flow.add.s(4, 4)]
    workflow = chord(members, flow.tsum.s()).on_error(flow.errback.s())
    with running_worker(flow.app) as worker:
        handle = workflow.delay()
        # Then the chord's result names the member, and the errback runs once
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(lambda: flow.runs["errback"] and flow.runs["add"] == 3, "the errback")
        worker.errors.clear()
    member = flow.published.of("wf.boom")[0].id
    assert failed.value.task_id == member
    assert flow.runs["tsum"] == 0
    assert flow.runs["errback"] == 1
    assert flow.errors[0][0] == member and flow.errors[0][1]["type"] == "RuntimeError"


def test_chord_member_delivered_twice_counts_once(flow: Flow) -> None:
    # Given a chord of three members, the last held at a gate
    app = flow.app
    members = [flow.add.s(1, 1), flow.add.s(2, 2), flow.gated.s(3)]
    with running_worker(app, concurrency=3) as worker:
        handle = chord(members, flow.tsum.s()).delay()
        first = flow.published.of("wf.add")[0]
        wait_for(lambda: worker.settled == 2, "the first two members")
        # When the first member's message is published again, twice, before the chord completes
        app.send(first)
        app.send(first)
        wait_for(lambda: worker.settled == 4, "the copies to be handled")
        wait_for(lambda: flow.runs["gated"] == 1, "the gated member")
        flow.gate.set()
        # Then the callback runs once, with one value per member
        assert handle.get(timeout=WAIT) == 2 + 4 + 3
        # And copies of every member and of the callback, after it ran, change nothing
        for message in [*flow.published.of("wf.add"), *flow.published.of("wf.gated")]:
            app.send(message)
        callback = flow.published.of("wf.tsum")
        assert len(callback) == 1
        app.send(callback[0])
        wait_for(lambda: len(flow.published.of("wf.tsum")) == 2, "the callback's copy")
        drain(worker, WAIT, raise_errors=False)
    assert flow.runs["tsum"] == 1
    assert app.backend.get(chord_fired_key(handle.id)) is not None


def _done(app: App, task_id: str) -> bool:
    stored = app.backend.get_result(task_id)
    return stored is not None and stored[1]


def test_chord_callback_copies_never_run_twice(make_app: Callable[..., App]) -> None:
    # Given a callback running for longer than its run lease lasts (it is renewed)
    f = Flow(make_app("memory://", backend="memory://"), lease_ttl=0.5)
    app = f.app
    with running_worker(app, concurrency=3) as worker:
        handle = chord([f.add.s(1, 1)], f.gated.s()).delay()
        wait_for(lambda: f.runs["gated"] == 1, "the callback to start")
        # When a copy of the callback's message arrives meanwhile
        received = worker.received
        app.send(f.published.of("wf.gated")[0])
        # Then the copy is deferred, again and again, for longer than the lease lasts
        wait_for(lambda: worker.received >= received + 5, "the copy deferred 4 times")
        f.gate.set()
        assert handle.get(timeout=WAIT) == [2]
        # And once the first is done, the copy is acknowledged without running
        drain(worker, WAIT, raise_errors=False)
    assert f.runs["gated"] == 1


def test_step_whose_value_cannot_travel_fails_the_chain(make_app: Callable[..., App]) -> None:
    # Given a chain whose first value, with the second step's arguments, is too large to send
    f = Flow(make_app("memory://", backend="memory://", max_message_size=2048))

    @f.app.task(name="wf.text")
    def text(n: int) -> str:
        return "y" * n

    @f.app.task(name="wf.join")
    def join(a: str, b: str) -> str:
        return a + b

    workflow = chain(text.s(1500), join.s("x" * 600), join.s("z")).on_error(f.errback.s())
    with running_worker(f.app):
        handle = workflow.delay()
        # Then the chain fails naming the step that could not be sent, and its errback runs
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=WAIT)
        wait_for(lambda: f.errors, "the errback")
    assert failed.value.task_id == handle.steps[1].id
    assert failed.value.exc_type == "EncodeError"
    assert handle.steps[0].get(timeout=1) == "y" * 1500
    assert f.errors == [(handle.steps[1].id, f.errors[0][1])]
    assert f.errors[0][1]["reason"] == "unsendable"


def test_empty_chord_runs_its_callback_with_no_values(memory_flow: Flow) -> None:
    f = memory_flow
    with running_worker(f.app):
        assert chord([], f.tsum.s(5)).delay().get(timeout=WAIT) == 5


def test_workers_continue_workflows_without_the_app_installing_workflow(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task(name="plain.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="plain.total")
    def total(values: list[int]) -> int:
        return sum(values)

    assert not any(isinstance(m, Workflow) for m in app.middleware)
    with running_worker(app):
        assert chain(add.s(1, 2), add.s(3)).delay().get(timeout=WAIT) == 6
        assert chord([add.s(1, 1), add.s(2, 2)], total.s()).delay().get(timeout=WAIT) == 6


def test_workflows_example_runs_on_the_embedded_broker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTASKS_")}
    result = subprocess.run(
        [sys.executable, "examples/workflows.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "chain: 10" in result.stdout
    assert "group: [0, 2, 4, 6, 8]" in result.stdout
    assert "chord: 9900" in result.stdout


# -- signatures ------------------------------------------------------------------------


def test_signature_alone_and_its_errback(memory_flow: Flow) -> None:
    f = memory_flow
    with running_worker(f.app) as worker:
        assert f.add.s(2).delay(1).get(timeout=WAIT) == 3
        handle = f.boom.s(5).on_error(f.errback.s()).apply_async()
        with pytest.raises(TaskFailed):
            handle.get(timeout=WAIT)
        wait_for(lambda: f.errors, "the errback")
        worker.errors.clear()
    assert f.errors[0][0] == handle.id


def test_signature_json_form_round_trips(memory_flow: Flow) -> None:
    f = memory_flow
    sig = f.add.si(1, y=2).set(queue="q1", priority=3, countdown=1.5).on_error(f.errback.s())
    data = sig.to_dict()
    assert data == {
        "task": "wf.add",
        "args": [1],
        "kwargs": {"y": 2},
        "options": {"queue": "q1", "priority": 3, "countdown": 1.5},
        "immutable": True,
        "id": None,
        "on_error": [f.errback.s().to_dict()],
    }
    assert Signature.from_dict(f.app, data) == sig
    assert repr(sig) == "wf.add.si(1, y=2)"
    with pytest.raises(ValueError, match="'args' is not an array"):
        Signature.from_dict(f.app, {**data, "args": "x"})


# -- refused at delay() or construction ----------------------------------------------


def test_wrong_arguments_for_a_step_raise_at_delay_naming_it(memory_flow: Flow) -> None:
    f = memory_flow
    with pytest.raises(TypeError, match=r"Step 2 of the chain, wf\.add\.s\(3, 4\)"):
        chain(f.add.s(1, 2), f.add.s(3, 4)).delay()
    with pytest.raises(TypeError, match=r"Step 1 of the chain, wf\.add\.s\(1\)"):
        chain(f.add.s(1), f.add.s(3)).delay()
    with pytest.raises(TypeError, match=r"Member 2 of the group, wf\.add\.s\(\)"):
        group([f.add.s(1, 2), f.add.s()]).delay()
    with pytest.raises(TypeError, match=r"chord's callback wf\.add\.s\(\)"):
        chord([f.add.s(1, 2)], f.add.s()).delay()  # the values and nothing for y
    with pytest.raises(TypeError, match=r"on_error of Step 1"):
        chain(f.add.s(1, 2).on_error(f.add.s(1))).delay()
    # si() steps get no previous value: two arguments fit
    assert chain(f.add.s(1, 2), f.add.si(3, 4)).steps[1].immutable
    # Nothing was sent
    specs = [f.app.queue(q) for q in f.app.task_queues()]
    assert sum(f.app.transport.message_counts(specs).values()) == 0
    assert f.published.messages == []


def test_workflow_over_two_apps_is_refused(memory_flow: Flow, make_app: Callable[..., App]) -> None:
    other = make_app("memory://")

    @other.task(name="other.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match="mixes tasks of two apps"):
        chain(memory_flow.add.s(1, 2), add.s(3))
    with pytest.raises(ConfigurationError, match="mixes tasks of two apps"):
        chord([add.s(1, 2)], memory_flow.tsum.s())


def test_nestings_not_supported_are_refused_at_construction(memory_flow: Flow) -> None:
    f = memory_flow
    members = group([f.add.s(1, 2)])
    with pytest.raises(TypeError, match="A group cannot be a step of a chain"):
        chain(members, f.add.s(1, 2))  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="must hold signatures"):
        chain(f.add.s(1, 2), group([chain(f.add.s(1), f.add.s(2))]))
    with pytest.raises(TypeError, match="A chain ending in a group cannot be a member of a group"):
        group([chain(f.add.s(1, 2), members)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="A chord cannot be a member of a group"):
        group([chord([f.add.s(1, 2)], f.tsum.s())])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of signatures"):
        group(f.add.s(1, 2))  # type: ignore[call-overload, arg-type]


def test_workflows_need_a_result_backend(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")

    @app.task(name="nb.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match="A chain needs a result backend"):
        chain(add.s(1, 2), add.s(3)).delay()
    with pytest.raises(ConfigurationError, match="A chord needs a result backend"):
        chord([add.s(1, 2)], add.s(3)).delay()
