"""Pipelined publishing: ``with app.publishing():`` and ``await task.adelay()``."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from mqtasks import (
    App,
    BulkPublishError,
    ConfigurationError,
    EncodeError,
    Middleware,
    PublishError,
    PublishNacked,
    QueueSpec,
    TaskHandle,
    Unroutable,
)
from mqtasks.message import Message
from mqtasks.transport.envelope import Envelope
from tests._helpers.wait import wait_for

Items = Sequence[tuple[str, Envelope]]


class Recorder(Middleware):
    """Records the publish hooks: (hook, task id, thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def after_publish(self, app: App, message: Message) -> None:
        self.calls.append(("after_publish", message.id, threading.get_ident()))

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        self.calls.append(("after_publish_error", message.id, threading.get_ident()))


def refuse(app: App, monkeypatch: pytest.MonkeyPatch, refused: set[str]) -> list[list[str]]:
    """Make the broker refuse the messages whose ids are in ``refused``; return the
    ids of each ``publish_many`` call. The others are published for real."""
    transport = app.transport
    real = transport.publish_many
    calls: list[list[str]] = []

    def refusing(items: Items, **options: Any) -> list[BaseException | None]:
        calls.append([env.message_id or "" for _, env in items])
        keep = [i for i, (_, env) in enumerate(items) if env.message_id not in refused]
        if "delays" in options:
            options["delays"] = [options["delays"][i] for i in keep]
        answers = real([items[i] for i in keep], **options) if keep else []
        results: list[BaseException | None] = []
        kept = iter(answers)
        for _, env in items:
            if env.message_id in refused:
                results.append(PublishNacked("refused by the test", task_id=env.message_id))
            else:
                results.append(next(kept))
        return results

    monkeypatch.setattr(transport, "publish_many", refusing)
    return calls


@pytest.fixture
def gate(app: App, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every bulk publish of ``app`` until the event is set (set at teardown)."""
    opened = threading.Event()
    transport = app.transport
    real = transport.publish_many

    def held(items: Items, **options: Any) -> list[BaseException | None]:
        assert opened.wait(20), "the test never opened the gate"
        return real(items, **options)

    monkeypatch.setattr(transport, "publish_many", held)
    yield opened
    opened.set()


def ready(app: App, queue: str) -> int:
    return app.transport.message_counts([app.queue(queue)])[queue]


# -- the block's failure paths -------------------------------------------------------


def test_block_raises_naming_exactly_the_ids_the_broker_refused(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    app.middleware.append(recorder)

    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)  # declares the queue: the block's messages are counted alone below
    ids = [f"job-{n}" for n in range(30)]
    refused = {ids[3], ids[17], ids[29]}
    refuse(app, monkeypatch, refused)
    with pytest.raises(BulkPublishError) as raised, app.publishing(window=7) as batch:
        handles = [job.apply_async((n,), task_id=ids[n]) for n in range(30)]
    error = raised.value
    assert set(error.failed) == refused
    assert all(isinstance(e, PublishNacked) for e in error.failed.values())
    assert {h.id for h in error.sent} == set(ids) - refused
    assert batch.failed == error.failed
    for handle in handles:
        assert not handle.pending
        assert handle.confirmed is (handle.id not in refused)
        assert (handle.error is None) is (handle.id not in refused)
    assert ready(app, job.queue) == 1 + 27
    # Each message got its hook, in the thread that opened the block.
    me = threading.get_ident()
    block_calls = [c for c in recorder.calls if c[1] in ids]
    assert sorted(c[1] for c in block_calls if c[0] == "after_publish_error") == sorted(refused)
    assert len(block_calls) == 30
    assert {c[2] for c in block_calls} == {me}


def test_block_on_a_full_rabbitmq_queue_names_the_messages_it_rejected(
    amqp_url: str, make_app: Callable[..., App], queue_name: Callable[[str], str]
) -> None:
    name = queue_name("full")
    app = make_app(
        amqp_url,
        queues=[QueueSpec(name, queue_type="classic", max_length=2, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job(n: int) -> None: ...

    with pytest.raises(BulkPublishError) as raised, app.publishing():
        handles = [job.delay(n) for n in range(5)]
    # One channel, in order: the broker took the first two and rejected the rest.
    assert set(raised.value.failed) == {h.id for h in handles[2:]}
    assert all(isinstance(e, PublishNacked) for e in raised.value.failed.values())
    assert [h.id for h in raised.value.sent] == [h.id for h in handles[:2]]
    assert [h.confirmed for h in handles] == [True, True, False, False, False]
    assert ready(app, name) == 2


def test_block_names_the_messages_rabbitmq_could_not_route(
    amqp_url: str,
    make_app: Callable[..., App],
    queue_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app(amqp_url)
    gone = queue_name("gone")

    @app.task
    def kept(n: int) -> None: ...

    @app.task(queue=gone)
    def lost(n: int) -> None: ...

    lost.delay(0)
    kept.delay(0)
    app.transport.delete([app.queue(gone)])
    # The app still believes it is declared (else it would declare it again after the
    # first return, and the later messages would be routed).
    monkeypatch.setattr(app.transport, "declare", lambda specs: None)
    with pytest.raises(BulkPublishError) as raised, app.publishing(window=3):
        handles = [(kept if n % 2 else lost).delay(n) for n in range(10)]
    assert set(raised.value.failed) == {h.id for h in handles if h.queue == gone}
    assert all(isinstance(e, Unroutable) for e in raised.value.failed.values())
    assert ready(app, kept.queue) == 1 + 5


def test_handles_are_pending_inside_the_block_and_confirmed_after(
    app: App, gate: threading.Event
) -> None:
    @app.task
    def job(n: int) -> None: ...

    outside = job.delay(0)
    assert outside.confirmed and not outside.pending and outside.error is None
    with app.publishing() as batch:
        handles = [job.delay(n) for n in range(10)]
        assert all(h.pending and not h.confirmed for h in handles)
        assert batch.handles == handles
        gate.set()
    assert all(h.confirmed and not h.pending for h in handles)
    assert handles[0] == TaskHandle(handles[0].id, job.name, job.queue)  # equal as before
    assert ready(app, job.queue) == 11


def test_the_block_publishes_as_it_goes(app: App) -> None:
    """Messages leave while the block is open, not only at its exit: a crash inside
    the block loses only what is unconfirmed."""

    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    with app.publishing(window=1000) as batch:
        first = job.delay(0)  # nothing in flight: handed to the broker at once
        wait_for(lambda: ready(app, job.queue) == 2, "the first message, inside the block")

        def send_one_more() -> bool:
            job.delay(len(batch.handles))
            return first.confirmed

        # The first handle is settled by a later delay(), before the exit.
        wait_for(send_one_more, "the first message's confirm, inside the block")
    assert ready(app, job.queue) == 1 + len(batch.handles)


def test_an_exception_in_the_body_still_publishes_what_it_produced(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    with pytest.raises(ValueError, match="body"), app.publishing(window=2):
        handles = [job.delay(n) for n in range(5)]
        raise ValueError("body")
    assert all(h.confirmed for h in handles)
    assert ready(app, job.queue) == 5


def test_an_exception_in_the_body_and_refused_messages_raise_the_publish_error(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    refuse(app, monkeypatch, {"refused"})
    with pytest.raises(BulkPublishError) as raised, app.publishing():
        job.delay(0)
        job.apply_async((1,), task_id="refused")
        raise ValueError("body")
    assert set(raised.value.failed) == {"refused"}
    assert isinstance(raised.value.__context__, ValueError)


def test_checks_still_raise_at_the_call_inside_the_block(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    with app.publishing() as batch:
        with pytest.raises(TypeError):
            job.delay()  # type: ignore[call-arg]
        with pytest.raises(EncodeError):
            job.delay({1})  # type: ignore[arg-type]
        job.delay(1)
    assert len(batch.handles) == 1


def test_each_thread_has_its_own_block(app: App, gate: threading.Event) -> None:
    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    seen: dict[str, TaskHandle] = {}
    with app.publishing() as batch:
        mine = job.delay(0)
        # Another thread (even one that inherits this context) is not in the block:
        # its delay() publishes and waits as always; the gate holds only bulk publishes.
        other = threading.Thread(target=lambda: seen.update(plain=job.delay(1)))
        context = contextvars.copy_context()
        inheriting = threading.Thread(
            target=lambda: context.run(lambda: seen.update(inherited=job.delay(2)))
        )
        for thread in (other, inheriting):
            thread.start()
            thread.join(20)
        assert seen["plain"].confirmed and seen["inherited"].confirmed
        assert mine.pending
        assert batch.handles == [mine]
        gate.set()
    assert mine.confirmed


def test_blocks_in_two_threads_confirm_each_their_own(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    results: dict[int, list[TaskHandle]] = {}
    both_open = threading.Barrier(2, timeout=20)

    def run(k: int) -> None:
        with app.publishing(window=4) as batch:
            both_open.wait()
            for n in range(20):
                job.delay(k * 100 + n)
        assert batch.handles and all(h.confirmed for h in batch.handles)
        results[k] = batch.handles

    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [1, 2]
    assert len({h.id for h in results[1]} | {h.id for h in results[2]}) == 40
    assert ready(app, job.queue) == 41


def test_another_apps_task_inside_the_block_is_published_directly(
    app: App, make_app: Callable[..., App], gate: threading.Event
) -> None:
    other_app = make_app(app.settings.broker_url)

    @app.task
    def job(n: int) -> None: ...

    @other_app.task
    def elsewhere(n: int) -> None: ...

    with app.publishing() as batch:
        pending = job.delay(1)
        direct = elsewhere.delay(2)
        assert pending.pending
        assert direct.confirmed
        assert batch.handles == [pending]
        gate.set()
    assert ready(other_app, elsewhere.queue) == 1


def test_nested_blocks_each_confirm_their_own_at_their_exit(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    with app.publishing() as outer:
        first = job.delay(1)
        with app.publishing() as inner:
            second = job.delay(2)
        assert second.confirmed
        assert inner.handles == [second]
        third = job.delay(3)
    assert outer.handles == [first, third]
    assert all(h.confirmed for h in (first, second, third))
    assert ready(app, job.queue) == 3


def test_a_context_copied_inside_a_block_publishes_directly_after_it(app: App) -> None:
    """An asyncio task created inside the block keeps a copy of its context, block
    included; once the block has exited, its delay() must not land in the closed block."""

    @app.task
    def job(n: int) -> None: ...

    async def main() -> TaskHandle:
        release = asyncio.Event()

        async def later() -> TaskHandle:
            await release.wait()
            return job.delay(2)

        with app.publishing():
            job.delay(1)
            child = asyncio.ensure_future(later())
        release.set()
        return await child

    handle = asyncio.run(main())
    assert handle.confirmed and not handle.pending
    assert ready(app, job.queue) == 2


def test_a_countdown_inside_the_block_is_kept(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    with app.publishing():
        now = job.delay(1)
        later = job.apply_async((2,), countdown=60)
    assert now.confirmed and later.confirmed
    assert ready(app, job.queue) == 1  # a dropped delay would make it 2
    delayed = app.transport.delayed_counts([app.queue(job.queue)])
    assert delayed.get(job.queue, 1) == 1  # where the broker can tell


def test_a_delay_the_broker_cannot_hold_raises_at_the_call_inside_the_block(
    redis_url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(redis_url.replace("redis://", "redis+kombu://", 1))

    @app.task
    def job(n: int) -> None: ...

    with app.publishing() as batch:
        with pytest.raises(ConfigurationError, match="delay"):
            job.apply_async((1,), countdown=5)
        job.delay(2)
    assert [h.confirmed for h in batch.handles] == [True]


def test_a_block_is_used_once(app: App) -> None:
    block = app.publishing()
    with block:
        pass
    with pytest.raises(RuntimeError, match="used once"), block:
        pass
    with pytest.raises(ValueError, match="window"):
        app.publishing(window=0)


# -- adelay ----------------------------------------------------------------------------


def count_bulk_publishes(app: App, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    transport = app.transport
    real = transport.publish_many
    sizes: list[int] = []

    def counting(items: Items, **options: Any) -> list[BaseException | None]:
        sizes.append(len(items))
        return real(items, **options)

    monkeypatch.setattr(transport, "publish_many", counting)
    return sizes


def test_adelay_calls_gathered_together_share_one_publish(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    sizes = count_bulk_publishes(app, monkeypatch)

    async def main() -> tuple[list[TaskHandle], TaskHandle]:
        many = await asyncio.gather(*(job.adelay(n) for n in range(25)))
        lone = await job.adelay(99)  # published on the next iteration, no timer
        return list(many), lone

    many, lone = asyncio.run(main())
    assert sizes == [25, 1]
    assert all(h.confirmed for h in [*many, lone])
    assert len({h.id for h in many}) == 25
    assert ready(app, job.queue) == 27


def test_adelay_raises_its_own_publish_error(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    app.middleware.append(recorder)

    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)
    calls = refuse(app, monkeypatch, {"refused"})

    async def main() -> list[Any]:
        answers = await asyncio.gather(
            job.aapply_async((1,), task_id="fine"),
            job.aapply_async((2,), task_id="refused"),
            return_exceptions=True,
        )
        return list(answers)

    fine, refused = asyncio.run(main())
    assert calls == [["fine", "refused"]]
    assert isinstance(fine, TaskHandle) and fine.id == "fine"
    assert isinstance(refused, PublishError) and refused.task_id == "refused"
    assert ("after_publish_error", "refused", threading.get_ident()) in recorder.calls
    assert ready(app, job.queue) == 2


def test_adelay_checks_its_arguments(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    async def main() -> None:
        with pytest.raises(EncodeError):
            await job.adelay({1})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await job.adelay()  # type: ignore[call-arg]

    asyncio.run(main())


def test_aapply_async_keeps_its_countdown(app: App) -> None:
    @app.task
    def job(n: int) -> None: ...

    async def main() -> list[TaskHandle]:
        return list(await asyncio.gather(job.adelay(1), job.aapply_async((2,), countdown=60)))

    handles = asyncio.run(main())
    assert all(h.confirmed for h in handles)
    assert ready(app, job.queue) == 1  # a dropped delay would make it 2
