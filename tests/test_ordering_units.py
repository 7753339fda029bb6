"""The parts of ordered processing that need no broker: key digests and partition names,
the key lanes' sequencing, and partition ownership on the memory:// backend."""

from __future__ import annotations

import time
from typing import Any

import pytest
import structlog

from mqtasks.backend import resolve as resolve_backend
from mqtasks.exceptions import EncodeError
from mqtasks.ordering.assignment import Assignment, Change
from mqtasks.ordering.keys import (
    HEADER_OKEY,
    HEADER_OSEQ,
    key_digest,
    lease_name,
    parse_partition,
    partition_index,
    partition_name,
)
from mqtasks.ordering.lanes import SEQUENCE_GAP, Lanes
from mqtasks.transport.base import Delivery
from tests._helpers.brokers import unique_name
from tests._helpers.wait import wait_for

# -- keys ---------------------------------------------------------------------------------


def test_a_key_digest_is_16_hex_digits_of_its_canonical_json() -> None:
    assert len(key_digest(42)) == 16
    int(key_digest(42), 16)
    assert key_digest({"a": 1, "b": 2}) == key_digest({"b": 2, "a": 1})
    assert key_digest(7) != key_digest("7")
    with pytest.raises(EncodeError):
        key_digest(object())


def test_partition_names_are_zero_padded_to_the_width_of_the_last_index() -> None:
    assert partition_name("ledger", 3, 16) == "ledger.p03"
    assert partition_name("ledger", 3, 10) == "ledger.p3"
    assert partition_name("ledger", 7, 1024) == "ledger.p0007"
    assert partition_index("ff", 16) == 255 % 16


def test_only_the_partitions_of_ordered_queues_parse() -> None:
    ordered = {"ledger": 16}
    assert parse_partition("ledger.p03", ordered) == ("ledger", 3)
    assert parse_partition("ledger.p3", ordered) is None  # not padded: not ours
    assert parse_partition("ledger.p16", ordered) is None
    assert parse_partition("other.p03", ordered) is None
    assert parse_partition("ledger", ordered) is None


# -- lanes ---------------------------------------------------------------------------------


def delivery(seq: int, okey: str = "k1", queue: str = "ledger.p0") -> Delivery:
    return Delivery(
        b"{}", queue, 0, headers={HEADER_OKEY: okey, HEADER_OSEQ: seq}, message_id=f"{okey}-{seq}"
    )


def ids(out: list[tuple[Delivery, str | None]]) -> list[tuple[str | None, str | None]]:
    return [(d.message_id, reason) for d, reason in out]


def arrive(lanes: Lanes, d: Delivery, now: float = 0.0) -> list[tuple[str | None, str | None]]:
    okey, seq = d.headers[HEADER_OKEY], d.headers[HEADER_OSEQ]
    return ids(lanes.arrive(d, okey, seq, now))


def test_a_key_runs_one_delivery_at_a_time_in_sequence_order() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one, two, three = delivery(1), delivery(2), delivery(3)
    assert arrive(lanes, one) == [("k1-1", None)]
    assert arrive(lanes, two) == []  # waits behind the running one
    assert arrive(lanes, delivery(1, okey="k2")) == [("k2-1", None)]  # other keys go on
    assert arrive(lanes, three) == []
    assert ids(lanes.settled(one, 0.0)) == [("k1-2", None)]
    assert ids(lanes.settled(two, 0.0)) == [("k1-3", None)]
    assert ids(lanes.settled(three, 0.0)) == []


def test_the_first_number_seen_is_the_baseline() -> None:
    lanes = Lanes(gap_timeout=5.0)
    assert arrive(lanes, delivery(41)) == [("k1-41", None)]


def test_a_gap_waits_for_the_timeout_then_is_skipped_and_a_late_arrival_dead_lettered() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one = delivery(1)
    arrive(lanes, one)
    lanes.settled(one, 0.0)
    with structlog.testing.capture_logs() as logs:
        assert arrive(lanes, delivery(3), now=1.0) == []  # 2 is missing
        assert lanes.next_due() == 6.0
        assert ids(lanes.due(5.9)) == []
        assert ids(lanes.due(6.0)) == [("k1-3", None)]
    [skipped] = [e for e in logs if e["event"] == "ordering.gap_skipped"]
    assert skipped["missing"] == [2]
    assert arrive(lanes, delivery(2), now=7.0) == [("k1-2", SEQUENCE_GAP)]


def test_the_missing_number_arriving_in_time_closes_the_gap() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one, two = delivery(1), delivery(2)
    arrive(lanes, one)
    lanes.settled(one, 0.0)
    assert arrive(lanes, delivery(3), now=1.0) == []
    assert arrive(lanes, two, now=2.0) == [("k1-2", None)]
    assert ids(lanes.settled(two, 2.5)) == [("k1-3", None)]


def test_a_number_below_the_last_one_run_is_late_even_number_one() -> None:
    lanes = Lanes(gap_timeout=5.0)
    two = delivery(2)
    arrive(lanes, two)  # the baseline, after a takeover
    lanes.settled(two, 0.0)
    assert arrive(lanes, delivery(1)) == [("k1-1", SEQUENCE_GAP)]


def test_a_held_delivery_keeps_its_key_until_its_time() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one, two = delivery(1), delivery(2)
    arrive(lanes, one)
    arrive(lanes, two)
    lanes.hold(one, until=3.0)
    assert lanes.running() == 0
    assert ids(lanes.due(2.0)) == []
    assert ids(lanes.due(3.0)) == [("k1-1", None)]  # the same delivery, run again
    assert lanes.running() == 1
    assert ids(lanes.settled(one, 3.5)) == [("k1-2", None)]


def test_taking_a_partition_returns_what_has_not_started_in_arrival_order() -> None:
    lanes = Lanes(gap_timeout=5.0)
    a1, a2, b1, b2, c1 = (
        delivery(1, "a"),
        delivery(2, "a"),
        delivery(1, "b"),
        delivery(2, "b"),
        delivery(1, "c", queue="ledger.p1"),
    )
    for d in (a1, a2, b1, b2, c1):
        arrive(lanes, d)
    lanes.hold(b1, until=10.0)
    taken = lanes.take("ledger.p0")
    assert [d.message_id for d in taken] == ["a-2", "b-1", "b-2"]  # a-1 runs on
    assert lanes.running(["ledger.p0"]) == 1
    assert lanes.tracks(c1) and not lanes.tracks(b2)


def test_requeueing_a_delivery_takes_the_rest_of_its_key_with_it() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one, two, three = delivery(1), delivery(2), delivery(3)
    for d in (one, two, three):
        arrive(lanes, d)
    assert [d.message_id for d in lanes.requeue(one)] == ["k1-1", "k1-2", "k1-3"]
    assert len(lanes) == 0
    assert arrive(lanes, delivery(1)) == [("k1-1", None)]  # taken afresh when it comes again


# -- assignment ---------------------------------------------------------------------------


class Posted:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, changes: list[Change]) -> None:
        self.changes.extend(changes)

    def of(self, kind: str) -> list[str]:
        return [name for k, name in self.changes if k == kind]


def assignment(backend: Any, queue: str, posted: Posted, member: str) -> Assignment:
    return Assignment(
        backend, {queue: 4}, lease_ttl=5.0, post=posted, member=member, takeover_delay=30.0
    )


def test_workers_share_partitions_fairly_and_an_extra_is_released_only_once_drained() -> None:
    backend = resolve_backend("memory://")
    queue = unique_name("ledger")
    first_posted, second_posted = Posted(), Posted()
    first = assignment(backend, queue, first_posted, "a")
    second = assignment(backend, queue, second_posted, "b")
    # Given one worker alone: it takes every partition
    first.cycle()
    assert len(first_posted.of("add")) == 4 and len(first.owned) == 4
    # When a second joins, the first gives up two gracefully; the second waits for them
    second.cycle()
    first.cycle()
    releasing = first_posted.of("release")
    assert len(releasing) == 2 and second_posted.of("add") == []
    second.cycle()
    assert second_posted.of("add") == []  # their leases are still held until drained
    # Then, once the first has drained them, the second takes them
    for name in releasing:
        first.released(name)
    first.cycle()
    second.cycle()
    assert sorted(second_posted.of("add")) == sorted(releasing)
    assert len(first.owned) == len(second.owned) == 2
    first.stop()
    second.cycle()
    assert len(second.owned) == 4  # the first's leases were released at its stop
    second.stop()


def test_a_lease_another_worker_took_is_lost() -> None:
    backend = resolve_backend("memory://")
    queue = unique_name("ledger")
    posted = Posted()
    alone = Assignment(backend, {queue: 1}, lease_ttl=5.0, post=posted, member="a")
    alone.cycle()
    backend.release_lease(lease_name(queue, 0), "a")
    assert backend.acquire_lease(lease_name(queue, 0), "intruder", 5.0) is not None
    with structlog.testing.capture_logs() as logs:
        alone.cycle()
    assert posted.of("lost") == [partition_name(queue, 0, 1)]
    assert [e["event"] for e in logs if e["event"] == "ordering.lease_lost"]


def test_a_partition_taken_over_from_a_worker_that_died_is_consumed_after_the_delay() -> None:
    backend = resolve_backend("memory://")
    queue = unique_name("ledger")
    dead_posted, posted = Posted(), Posted()
    dead = Assignment(backend, {queue: 1}, lease_ttl=5.0, post=dead_posted, member="dead")
    dead.cycle()
    assert dead_posted.of("add") == [partition_name(queue, 0, 1)]
    # Given its owner died: its lease runs out, and it never gave the partition back
    backend.release_lease(lease_name(queue, 0), "dead")
    heir = Assignment(
        backend, {queue: 1}, lease_ttl=5.0, post=posted, member="heir", takeover_delay=0.2
    )
    with structlog.testing.capture_logs() as logs:
        heir.cycle()
    # Then the heir holds it, but consumes it only after the takeover delay
    assert len(heir.owned) == 1 and posted.of("add") == []
    assert [e for e in logs if e["event"] == "ordering.takeover_wait"]
    time.sleep(0.25)
    heir.cycle()
    assert posted.of("add") == [partition_name(queue, 0, 1)]
    # And a partition given back in good order is consumed at once by the next owner
    heir.stop()
    again = Posted()
    Assignment(
        backend, {queue: 1}, lease_ttl=5.0, post=again, member="next", takeover_delay=30.0
    ).cycle()
    assert again.of("add") == [partition_name(queue, 0, 1)]


def test_workers_started_together_each_take_their_share_after_the_settle_window() -> None:
    backend = resolve_backend("memory://")
    queue = unique_name("ledger")
    posted = [Posted(), Posted()]
    made = [
        Assignment(backend, {queue: 4}, lease_ttl=60.0, post=p, member=m, settle=0.5)
        for p, m in zip(posted, "ab", strict=True)
    ]
    try:
        # Given two workers started one after the other, within the settle window
        for a in made:
            a.start()
        # Then each takes two partitions, and neither took more to give back
        wait_for(lambda: [len(p.of("add")) for p in posted] == [2, 2], lambda: str(posted))
        assert posted[0].of("release") == posted[1].of("release") == []
        assert not set(posted[0].of("add")) & set(posted[1].of("add"))
    finally:
        for a in made:
            a.stop()


def test_a_joining_worker_gets_its_share_before_the_next_round() -> None:
    """Joining and giving back bump the queue's epoch: the others rebalance at once, not at
    their next round (30 s here, beyond the wait)."""
    backend = resolve_backend("memory://")
    queue = unique_name("ledger")
    first_posted, second_posted = Posted(), Posted()
    first = Assignment(backend, {queue: 4}, lease_ttl=90.0, post=first_posted, settle=0.0)
    second = Assignment(backend, {queue: 4}, lease_ttl=90.0, post=second_posted, settle=0.0)
    try:
        first.start()
        wait_for(lambda: len(first_posted.of("add")) == 4, "the first to take every partition")
        # When a second worker joins, the first gives up two
        second.start()
        wait_for(lambda: len(first_posted.of("release")) == 2, "the first to release two")
        # Then, once they are drained, the second takes them
        for name in first_posted.of("release"):
            first.released(name)
        wait_for(lambda: len(second_posted.of("add")) == 2, "the second's share")
        assert set(second_posted.of("add")) == set(first_posted.of("release"))
        # And when the first leaves, the second takes its partitions too
        first.stop()
        wait_for(lambda: len(second_posted.of("add")) == 4, "the second to take them all")
    finally:
        first.stop()
        second.stop()


def test_a_frozen_queue_dispatches_nothing_until_thawed() -> None:
    lanes = Lanes(gap_timeout=5.0)
    one, two = delivery(1), delivery(2)
    arrive(lanes, one)
    lanes.frozen.add("ledger.p0")  # being given up: what runs finishes, nothing starts
    assert arrive(lanes, two) == []
    assert ids(lanes.settled(one, 0.0)) == []
    assert lanes.running(["ledger.p0"]) == 0
    assert ids(lanes.thaw("ledger.p0", 0.0)) == [("k1-2", None)]
