"""The one record of publisher confirms that every confirmed RabbitMQ publish shares."""

from __future__ import annotations

import threading

from mqtasks.transport.amqp.confirms import Confirm, Confirms


def _published(
    count: int, confirms: Confirms[Confirm] | None = None
) -> tuple[Confirms[Confirm], list[Confirm]]:
    """``count`` messages recorded as published, tags 1 to ``count``."""
    confirms = Confirms() if confirms is None else confirms
    sent = [Confirm() for _ in range(count)]
    assert [confirms.add(c) for c in sent] == list(range(1, count + 1))
    return confirms, sent


def test_a_multiple_ack_settles_every_message_up_to_its_tag_and_no_later() -> None:
    confirms, sent = _published(4)
    confirms.on_ack(3, True)
    assert [c.outcome for c in sent] == ["ack", "ack", "ack", None]
    assert list(confirms.pending) == [4]


def test_a_single_nack_is_told_to_its_own_message_only() -> None:
    confirms, sent = _published(3)
    confirms.on_nack(2, False)
    assert [c.outcome for c in sent] == [None, "nack", None]
    confirms.on_ack(3, True)
    assert [c.outcome for c in sent] == ["ack", "nack", "ack"]
    assert confirms.pending == {}


def test_an_answer_for_a_settled_or_unknown_tag_changes_nothing() -> None:
    confirms, sent = _published(2)
    confirms.on_nack(1, False)
    confirms.on_ack(1, False)
    confirms.on_ack(7, False)
    assert [c.outcome for c in sent] == ["nack", None]
    assert list(confirms.pending) == [2]


def test_each_settled_message_is_handed_on_under_the_lock() -> None:
    lock = threading.Lock()
    seen: list[tuple[str | None, bool]] = []
    confirms, _ = _published(
        3, Confirms(lock=lock, on_settle=lambda c: seen.append((c.outcome, lock.locked())))
    )
    confirms.on_ack(2, True)
    confirms.on_nack(3, False)
    assert seen == [("ack", True), ("ack", True), ("nack", True)]
    assert not lock.locked()
