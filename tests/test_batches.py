"""Batch consumption (``@app.task(batch_size=..., batch_wait=...)``): batches form,
a partial batch runs after ``batch_wait``, acks are per message (``BatchFailures``
retries and dead-letters only its items, each with its own attempts), bad input is
dead-lettered alone, the start-up checks, and a stopping worker loses nothing; on
memory and the real brokers."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mqtasks import App, BatchFailures, ConfigurationError, Worker
from mqtasks.message import Message
from mqtasks.middleware import Middleware
from mqtasks.testing import drain, running_worker
from mqtasks.validation import check_app
from tests._helpers.wait import wait_for


def _index_app(app: App, size: int = 10, wait: float = 0.3, **options: Any) -> list[list[int]]:
    """Register ``index`` (batch task) on ``app``; return the batches it saw."""
    seen: list[list[int]] = []

    @app.task(name="index", batch_size=size, batch_wait=wait, retry_backoff=0, **options)
    def index(items: list[int]) -> None:
        seen.append(list(items))

    return seen


def test_full_batches_form_and_a_partial_one_runs_after_batch_wait(app: App) -> None:
    seen = _index_app(app, size=10, wait=0.5)
    index = app.tasks["index"]
    with app.publishing():
        for i in range(25):
            index.delay(i)
    with running_worker(app, concurrency=2, prefetch=40) as worker:
        wait_for(lambda: sum(len(b) for b in seen) == 25, "the batches", timeout=15)
        drain(worker)
        assert worker.settled == 25
    sizes = sorted(len(b) for b in seen)
    assert sizes[-2:] == [10, 10] and sum(sizes) == 25
    assert sorted(i for b in seen for i in b) == list(range(25))
    assert app.dead_letters() == []


def test_a_lone_item_waits_batch_wait_then_runs(app: App) -> None:
    seen = _index_app(app, size=100, wait=0.4)
    ran_at: list[float] = []
    app.middleware.append(_Stamp(ran_at))
    with running_worker(app, prefetch=100) as worker:
        sent = time.monotonic()
        app.tasks["index"].delay(7)
        wait_for(lambda: seen == [[7]], "the batches", timeout=10)
        drain(worker)
    waited = ran_at[0] - sent
    assert 0.3 <= waited < 3.0, waited


class _Stamp(Middleware):
    """A middleware noting when each message starts."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def before_process(self, worker: Worker, message: Message) -> None:
        self.stamps.append(time.monotonic())


class _PerMessage(Middleware):
    """Keeps each message's state in a thread-local, as middleware may; notes mismatches."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.pairs: list[tuple[str, str, BaseException | None]] = []

    def before_process(self, worker: Worker, message: Message) -> None:
        self._local.id = message.id

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        self.pairs.append((message.id, self._local.id, exception))


def test_each_message_keeps_its_middleware_state_and_outcome(app: App) -> None:
    spy = _PerMessage()
    app.middleware.append(spy)

    @app.task(name="index", batch_size=4, batch_wait=0.2, max_retries=0)
    def index(items: list[int]) -> None:
        raise BatchFailures({1: ValueError("bad")})

    with app.publishing():
        ids = [index.delay(i).id for i in range(4)]
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: len(spy.pairs) == 4, "the after_process hooks", timeout=15)
        drain(worker, raise_errors=False)
    assert sorted(p[0] for p in spy.pairs) == sorted(ids)
    assert all(mine == seen for mine, seen, _ in spy.pairs), spy.pairs
    failed = [mine for mine, _, exc in spy.pairs if exc is not None]
    assert len(failed) == 1 and [e.id for e in app.dead_letters()] == failed


def test_batch_failures_retry_and_dead_letter_only_their_items(app: App) -> None:
    runs: list[list[int]] = []

    @app.task(name="index", batch_size=5, batch_wait=0.2, max_retries=1, retry_backoff=0)
    def index(items: list[int]) -> None:
        runs.append(list(items))
        bad = {i: ValueError(f"bad {item}") for i, item in enumerate(items) if item % 5 == 3}
        if bad:
            raise BatchFailures(bad)

    with app.publishing():
        handles = {i: index.delay(i) for i in range(10)}
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: len(app.dead_letters()) == 2, "the batches", timeout=20)
        drain(worker, raise_errors=False)
    ran = [i for batch in runs for i in batch]
    # Every good item ran once; each bad one twice (its retry), then dead-lettered alone.
    assert sorted(i for i in ran if i % 5 != 3) == [0, 1, 2, 4, 5, 6, 7, 9]
    assert sorted(i for i in ran if i % 5 == 3) == [3, 3, 8, 8]
    entries = app.dead_letters()
    assert sorted(e.id for e in entries) == sorted([handles[3].id, handles[8].id])
    assert {(e.reason, e.attempts) for e in entries} == {("max_retries_exceeded", 2)}
    assert all("ValueError: bad" in (e.exception or "") for e in entries)


def test_any_other_exception_fails_every_item_each_on_its_own(app: App) -> None:
    runs: list[list[int]] = []

    @app.task(name="index", batch_size=3, batch_wait=0.2, max_retries=1, retry_backoff=0)
    def index(items: list[int]) -> None:
        runs.append(list(items))
        raise RuntimeError("the index is down")

    with app.publishing():
        for i in range(3):
            index.delay(i)
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: len(app.dead_letters()) == 3, "the batches", timeout=20)
        drain(worker, raise_errors=False)
    assert sorted(i for batch in runs for i in batch) == [0, 0, 1, 1, 2, 2]
    entries = app.dead_letters()
    assert {(e.reason, e.attempts) for e in entries} == {("max_retries_exceeded", 2)}


def test_a_message_with_other_arguments_is_dead_lettered_alone(app: App) -> None:
    seen = _index_app(app, size=3, wait=0.2)
    index = app.tasks["index"]
    index.delay(1)
    # As another publisher might send it (delay() checks the arguments first).
    bad = app.send(Message(id=uuid.uuid4().hex, task="index", queue=index.queue, args=(1, 2)))
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: len(app.dead_letters()) == 1 and seen == [[1]], "the batches", timeout=15)
        drain(worker, raise_errors=False)
    [entry] = app.dead_letters()
    assert (entry.id, entry.reason) == (bad.id, "invalid_arguments")
    assert "one item as its only positional argument" in (entry.detail or "")


def test_calling_a_batch_task_runs_the_function_on_a_list() -> None:
    app = App("direct", broker="memory://")
    seen = _index_app(app)
    app.tasks["index"]([1, 2])
    assert seen == [[1, 2]]


def test_several_batch_tasks_and_a_plain_task_share_a_worker(app: App) -> None:
    a: list[int] = []
    b: list[int] = []
    plain: list[int] = []

    @app.task(name="a", batch_size=4, batch_wait=0.2)
    def task_a(items: list[int]) -> None:
        a.extend(items)

    @app.task(name="b", batch_size=4, batch_wait=0.2)
    def task_b(items: list[int]) -> None:
        b.extend(items)

    @app.task(name="plain")
    def task_plain(x: int) -> None:
        plain.append(x)

    with app.publishing():
        for i in range(6):
            task_a.delay(i)
            task_b.delay(-i)
            task_plain.delay(i)
    with running_worker(app, concurrency=1, prefetch=8) as worker:
        wait_for(lambda: len(a) == len(b) == len(plain) == 6, "the batches", timeout=15)
        drain(worker)
    assert sorted(a) == sorted(plain) == list(range(6))
    assert sorted(b) == sorted(-i for i in range(6))


def test_an_async_batch_function_runs_on_the_event_loop(app: App) -> None:
    seen: list[list[int]] = []

    @app.task(name="aindex", batch_size=3, batch_wait=0.2)
    async def aindex(items: list[int]) -> None:
        seen.append(list(items))

    for i in range(3):
        aindex.delay(i)
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: sum(len(s) for s in seen) == 3, "the batches", timeout=15)
        drain(worker)
    assert sorted(i for s in seen for i in s) == [0, 1, 2]


def test_stopping_with_a_partial_batch_hands_its_messages_back(app: App) -> None:
    seen = _index_app(app, size=50, wait=30.0)
    index = app.tasks["index"]
    with app.publishing():
        for i in range(5):
            index.delay(i)
    worker = Worker(app, concurrency=2, prefetch=50, shutdown_timeout=5)
    worker.start()
    try:
        wait_for(lambda: worker._batches.held == 5, "the batches", timeout=15)
    finally:
        assert worker.stop() is True
    assert seen == [] and worker.settled == 5
    # Handed back: in the queue again, and the next worker gets every one of them.
    spec = app.queue(index.queue)
    wait_for(lambda: app.transport.message_counts([spec])[index.queue] == 5, "the queue")
    index.flow = dataclasses.replace(index.flow, batch_wait=0.2)  # no 30 s wait this time
    with running_worker(app, prefetch=50) as again:
        wait_for(lambda: sum(len(s) for s in seen) == 5, "the batches", timeout=15)
        drain(again)
    assert sorted(i for s in seen for i in s) == list(range(5))


def test_a_running_batch_finishes_within_the_grace_at_stop(app: App) -> None:
    started, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    @app.task(name="index", batch_size=3, batch_wait=0.1)
    def index(items: list[int]) -> None:
        started.set()
        release.wait(10)
        seen.append(list(items))

    for i in range(3):
        index.delay(i)
    worker = Worker(app, concurrency=2, prefetch=10, shutdown_timeout=10)
    worker.start()
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    assert worker.stop() is True
    assert sorted(seen[0]) == [0, 1, 2] and worker.settled == 3


# -- start-up checks -------------------------------------------------------------------


def test_a_prefetch_below_batch_size_is_refused_with_what_to_set(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    _index_app(app, size=100)
    with pytest.raises(ConfigurationError, match=r"prefetch is 8.*at least 100"):
        Worker(app, concurrency=4, prefetch=8)
    with pytest.raises(ConfigurationError, match="at least 100"):
        check_app(app, concurrency=2, prefetch=4)
    check_app(app, concurrency=2, prefetch=100)


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"ordering_key": "items"}, "ordering_key"),
        ({"broadcast": True}, "broadcast"),
        ({"time_limit": 5}, "hard time_limit"),
        ({"concurrency_limit": 1}, "concurrency_limit"),
    ],
)
def test_batch_tasks_cannot_be_ordered_broadcast_or_hard_limited(
    make_app: Callable[..., App], options: dict[str, Any], refused: str
) -> None:
    app = make_app(backend="memory://")
    try:
        _index_app(app, size=2, **options)
    except ConfigurationError as exc:  # refused at definition already
        assert refused.split()[-1] in str(exc) or "batch" in str(exc)
        return
    with pytest.raises(ConfigurationError, match=refused):
        check_app(app, concurrency=1, prefetch=10)


def test_a_soft_time_limit_applies_to_the_whole_batch(app: App) -> None:
    from mqtasks import SoftTimeLimitExceeded

    caught: list[int] = []

    @app.task(name="index", batch_size=2, batch_wait=0.1, soft_time_limit=0.2, max_retries=0)
    def index(items: list[int]) -> None:
        try:
            while True:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            caught.append(len(items))
            raise

    index.delay(1)
    index.delay(2)
    with running_worker(app, prefetch=10) as worker:
        wait_for(lambda: len(app.dead_letters()) == 2, "the batches", timeout=15)
        drain(worker, raise_errors=False)
    assert sum(caught) == 2


# -- the harness scenario's judgement (S21), on a fabricated ledger ----------------------


def test_s21_figures_tell_good_items_that_did_not_run_and_bad_ones_not_dead_alone() -> None:
    from reliability.batches import batch_figures
    from reliability.ledger import Event

    def dead(task_id: str, reason: str, attempt: int) -> Event:
        return Event("dead", task_id, 9.0, attempt=attempt, info={"reason": reason})

    events = [
        Event("done", "g1", 1.0),
        Event("done", "g2", 1.0),
        dead("b1", "max_retries_exceeded", 2),
        dead("b2", "max_retries_exceeded", 2),
    ]
    f = batch_figures(events, {"g1", "g2"}, {"b1", "b2"})
    assert f["good_not_done"]["n"] == 0 and f["good_dead_n"] == 0 and not f["bad_done"]
    assert f["bad_reasons"] == {"max_retries_exceeded": 2} and f["bad_attempts"] == {"2": 2}
    events = [Event("done", "g1", 1.0), Event("done", "b1", 1.0), dead("g2", "rejected", 1)]
    f = batch_figures(events, {"g1", "g2"}, {"b1", "b2"})
    assert f["good_not_done"] == {"n": 1, "sample": ["g2"]} and f["good_dead"] == ["g2"]
    assert f["bad_done"] == ["b1"] and f["bad_not_dead"] == {"n": 2, "sample": ["b1", "b2"]}
