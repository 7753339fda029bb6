"""Each ``delay()`` on RabbitMQ waits for the broker's confirm of its own message."""

from __future__ import annotations

import threading

import pytest

from mqtasks import App, BulkPublishError, PublishNacked, QueueSpec, Unroutable
from mqtasks.transport.base import dead_letter_spec
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


def test_a_nack_and_a_return_are_told_to_their_own_message_only(
    amqp_url: str, make_app, queue_name
) -> None:
    """On one pooled channel, outcomes before and after a nack or a return stay in step."""
    name = queue_name("bounded")
    app: App = make_app(
        amqp_url,
        publish_pool_size=1,
        queues=[QueueSpec(name, queue_type="classic", max_length=2, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job() -> None: ...

    job.delay()
    job.delay()
    for _ in range(3):  # the queue is full: every further message is nacked
        with pytest.raises(PublishNacked):
            job.delay()
    app.transport.purge([app.queue(name)])
    gone = queue_name("gone")
    job.apply_async(queue=gone)
    # Its dead-letter queue goes too: the Unroutable below clears the declared
    # names, so the fixture's cleanup would not know of it.
    app.transport.delete([app.queue(gone), dead_letter_spec(app.queue(gone))])
    app.transport._declared.add(gone)  # the app still believes it is declared
    with pytest.raises(Unroutable):
        job.apply_async(queue=gone)
    job.delay()  # the channel's next confirm is this message's, an ack
    assert app.transport.message_counts([app.queue(name)]) == {name: 1}


@pytest.mark.parametrize("confirm", [True, False])
def test_threads_publishing_at_once_each_get_their_message_in(
    amqp_url: str, make_app, confirm: bool
) -> None:
    app: App = make_app(
        amqp_url, publish_pool_size=3, transport_options={"confirm_publish": confirm}
    )

    @app.task
    def job(n: int) -> None: ...

    errors: list[BaseException] = []

    def publish(first: int) -> None:
        try:
            for n in range(first, first + 50):
                job.delay(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(k * 50,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []

    def counts() -> dict[str, int]:
        return app.transport.message_counts([app.queue(job.queue)])

    if confirm:  # every delay() returned after its confirm: the broker has them all now
        assert counts() == {job.queue: 300}
    else:  # without confirms the broker may still be reading what was sent
        wait_for(lambda: counts() == {job.queue: 300}, lambda: f"300 messages, {counts()}", 10)


def test_a_bulk_send_into_a_full_queue_names_exactly_the_refused_messages(
    amqp_url: str, make_app, queue_name
) -> None:
    name = queue_name("bounded")
    app: App = make_app(
        amqp_url,
        queues=[QueueSpec(name, queue_type="classic", max_length=5, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job(n: int) -> None: ...

    with pytest.raises(BulkPublishError) as info:
        job.map(range(8))
    assert len(info.value.sent) == 5
    assert len(info.value.failed) == 3
    assert all(isinstance(e, PublishNacked) for e in info.value.failed.values())
    assert {h.id for h in info.value.sent}.isdisjoint(info.value.failed)
    assert app.transport.message_counts([app.queue(name)]) == {name: 5}


def test_a_bulk_send_larger_than_the_confirm_window_gets_every_message_in(
    amqp_url: str, make_app
) -> None:
    app: App = make_app(amqp_url)

    @app.task
    def job(n: int) -> None: ...

    count = app.transport.confirm_window * 2 + 500  # type: ignore[attr-defined]
    handles = job.map(range(count))
    assert len({h.id for h in handles}) == count
    assert app.transport.message_counts([app.queue(job.queue)]) == {job.queue: count}
