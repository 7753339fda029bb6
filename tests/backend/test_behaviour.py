"""What every state backend does: memory, Redis and PostgreSQL pass the same tests."""

from __future__ import annotations

import functools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mqtasks.backend import Backend
from mqtasks.backend.base import ResultWrite
from tests._helpers.wait import wait_for

T = TypeVar("T")

#: Threads of the race tests.
THREADS = 8


def race(jobs: list[Callable[[], T]], threads: int = THREADS) -> list[T]:
    """Run ``jobs`` on ``threads`` threads that start together; return their results in order."""
    barrier = threading.Barrier(threads)

    def start_together(job: Callable[[], T], first: bool) -> T:
        if first:
            barrier.wait(timeout=30)
        return job()

    with ThreadPoolExecutor(threads) as pool:
        # The first ``threads`` jobs wait for each other, so the threads start at once.
        futures = [pool.submit(start_together, job, i < threads) for i, job in enumerate(jobs)]
        return [f.result(timeout=120) for f in futures]


# -- results -----------------------------------------------------------------------------


def test_the_first_final_record_wins(backend: Backend) -> None:
    assert backend.get_result("t") is None
    assert backend.store_result("t", b"first", final=True, expires=60) is True

    assert backend.store_result("t", b"second", final=True, expires=60) is False
    assert backend.get_result("t") == (b"first", True)


def test_a_non_final_record_is_replaced_but_never_written_over_a_final_one(
    backend: Backend,
) -> None:
    assert backend.store_result("t", b"started", final=False, expires=60) is True
    assert backend.get_result("t") == (b"started", False)
    assert backend.store_result("t", b"retrying", final=False, expires=60) is True
    assert backend.get_result("t") == (b"retrying", False)

    assert backend.store_result("t", b"done", final=True, expires=60) is True
    assert backend.store_result("t", b"retrying again", final=False, expires=60) is False
    assert backend.get_result("t") == (b"done", True)


def test_a_final_write_among_racing_threads_is_won_once(backend: Backend) -> None:
    store = functools.partial(backend.store_result, "t", final=True, expires=60)
    won = race([functools.partial(store, b"%d" % i) for i in range(THREADS)])

    assert won.count(True) == 1
    assert backend.get_result("t") == (b"%d" % won.index(True), True)


def test_a_result_expires(backend: Backend) -> None:
    backend.store_result("short", b"x", final=True, expires=0.3)
    backend.store_result("long", b"y", final=True, expires=60)
    assert backend.get_result("short") == (b"x", True)

    wait_for(lambda: backend.get_result("short") is None, "the short result to expire")
    assert backend.get_result("long") == (b"y", True)
    # Expired, it is absent: a new final record may be stored.
    assert backend.store_result("short", b"z", final=True, expires=60) is True
    assert backend.get_result("short") == (b"z", True)


def test_store_results_stores_each_as_store_result_does(backend: Backend) -> None:
    # Given a final record stored already, and a non-final one
    backend.store_result("done", b"first", final=True, expires=60)
    backend.store_result("running", b"started", final=False, expires=60)

    # When a batch writes over both, twice over one new id, and a non-final record
    written = backend.store_results(
        [
            ResultWrite("done", b"second", True, 60),
            ResultWrite("running", b"finished", True, 60),
            ResultWrite("new", b"a", True, 60),
            ResultWrite("new", b"b", True, 60),
            ResultWrite("retrying", b"r", False, 60),
        ]
    )

    # Then each is written or not as on its own: the first final record wins
    assert written == [False, True, True, False, True]
    assert backend.get_results(["done", "running", "new", "retrying"]) == [
        (b"first", True),
        (b"finished", True),
        (b"a", True),
        (b"r", False),
    ]
    assert backend.store_results([]) == []


def test_store_results_wakes_the_waiters_of_each(backend: Backend) -> None:
    timer = threading.Timer(
        0.3,
        backend.store_results,
        [[ResultWrite("a", b"1", True, 60), ResultWrite("b", b"2", True, 60)]],
    )
    timer.start()
    try:
        got = race([lambda: backend.wait_result("a", 30), lambda: backend.wait_result("b", 30)], 2)
    finally:
        timer.join()

    assert got == [b"1", b"2"]


def test_get_results_keeps_the_order_asked(backend: Backend) -> None:
    backend.store_result("a", b"1", final=True, expires=60)
    backend.store_result("c", b"3", final=False, expires=60)

    assert backend.get_results(["c", "b", "a", "c"]) == [
        (b"3", False),
        None,
        (b"1", True),
        (b"3", False),
    ]
    assert backend.get_results([]) == []


def test_forget_deletes_a_result(backend: Backend) -> None:
    backend.store_result("t", b"x", final=True, expires=60)
    backend.forget("t")
    backend.forget("never-stored")

    assert backend.get_result("t") is None
    assert backend.store_result("t", b"y", final=True, expires=60) is True


def test_wait_result_returns_at_once_when_the_result_is_stored(backend: Backend) -> None:
    backend.store_result("t", b"x", final=True, expires=60)

    started = time.monotonic()
    assert backend.wait_result("t", timeout=30) == b"x"
    assert time.monotonic() - started < 10


def test_wait_result_wakes_when_another_thread_stores_it(backend: Backend) -> None:
    # Given a waiter, and a non-final record that must not wake it
    backend.store_result("t", b"started", final=False, expires=60)
    timer = threading.Timer(
        0.3, backend.store_result, ["t", b"done"], {"final": True, "expires": 60}
    )

    # When another thread stores the final record while it waits
    timer.start()
    started = time.monotonic()
    try:
        got = backend.wait_result("t", timeout=30)
    finally:
        timer.join()

    # Then it returns the record well before its timeout
    assert got == b"done"
    assert time.monotonic() - started < 10


def test_wait_result_ignores_other_tasks_and_non_final_records(backend: Backend) -> None:
    def others() -> None:
        backend.store_result("other", b"x", final=True, expires=60)
        backend.store_result("t", b"retrying", final=False, expires=60)

    timer = threading.Timer(0.1, others)
    timer.start()
    try:
        assert backend.wait_result("t", timeout=0.6) is None
    finally:
        timer.join()


def test_wait_result_returns_none_at_its_timeout(backend: Backend) -> None:
    started = time.monotonic()

    assert backend.wait_result("never", timeout=0.3) is None
    assert time.monotonic() - started >= 0.3
    assert backend.wait_result("never", timeout=0) is None


def test_waiters_of_one_task_all_wake(backend: Backend) -> None:
    timer = threading.Timer(
        0.3, backend.store_result, ["t", b"done"], {"final": True, "expires": 60}
    )
    timer.start()
    try:
        got = race([lambda: backend.wait_result("t", timeout=30)] * 4, threads=4)
    finally:
        timer.join()

    assert got == [b"done"] * 4


# -- values and counters ------------------------------------------------------------------


def test_set_if_absent_has_one_winner_among_racing_threads(backend: Backend) -> None:
    won = race(
        [functools.partial(backend.set_if_absent, "k", b"%d" % i, 60) for i in range(THREADS)]
    )

    assert won.count(True) == 1
    assert backend.get("k") == b"%d" % won.index(True)


def test_set_if_absent_takes_an_expired_key(backend: Backend) -> None:
    assert backend.set_if_absent("k", b"old", 0.3) is True
    assert backend.set_if_absent("k", b"new", 60) is False

    wait_for(lambda: backend.get("k") is None, "the key to expire")
    assert backend.set_if_absent("k", b"new", 60) is True
    assert backend.get("k") == b"new"


def test_put_replaces_and_delete_removes(backend: Backend) -> None:
    assert backend.get("k") is None
    backend.put("k", b"1", 60)
    backend.put("k", b"2", 60)
    assert backend.get("k") == b"2"

    backend.delete("k")
    backend.delete("k")
    assert backend.get("k") is None
    assert backend.set_if_absent("k", b"3", 60) is True


def test_incr_counts_every_increment_of_racing_threads(backend: Backend) -> None:
    per_thread = 50

    def add() -> list[int]:
        return [backend.incr("n", ttl=60) for _ in range(per_thread)]

    seen = [n for values in race([add] * THREADS) for n in values]

    assert sorted(seen) == list(range(1, THREADS * per_thread + 1))
    assert backend.incr("n", -THREADS * per_thread, ttl=60) == 0
    assert backend.get("n") == b"0"


def test_a_counter_expires_from_its_creation(backend: Backend) -> None:
    assert backend.incr("n", 5, ttl=0.3) == 5
    assert backend.incr("n", 1, ttl=60) == 6  # a later ttl does not extend it

    wait_for(lambda: backend.get("n") is None, "the counter to expire")
    assert backend.incr("n", 2, ttl=60) == 2


# -- sets ---------------------------------------------------------------------------------


def test_add_member_counts_distinct_members_of_racing_threads(backend: Backend) -> None:
    # Given 1,000 members, each added twice, by 8 threads in random orders
    members = [f"m{i}" for i in range(1000)]
    adds = members * 2
    random.Random(7).shuffle(adds)
    shares = [adds[i::THREADS] for i in range(THREADS)]

    def add(share: list[str]) -> list[tuple[bool, int]]:
        return [backend.add_member("set", m, ttl=60) for m in share]

    # When they race
    outcomes = [o for got in race([functools.partial(add, s) for s in shares]) for o in got]

    # Then each size was made by exactly one add, and one add saw the set complete
    added_sizes = Counter(size for added, size in outcomes if added)
    assert sorted(added_sizes) == list(range(1, 1001))
    assert set(added_sizes.values()) == {1}
    assert sum(1 for added, size in outcomes if added and size == 1000) == 1
    assert sum(1 for added, _ in outcomes if not added) == 1000
    assert all(1 <= size <= 1000 for _, size in outcomes)
    assert backend.members("set") == set(members)


def test_adding_a_member_again_does_not_count(backend: Backend) -> None:
    assert backend.add_member("s", "a", ttl=60) == (True, 1)
    assert backend.add_member("s", "a", ttl=60) == (False, 1)
    assert backend.add_member("s", "b", ttl=60) == (True, 2)
    assert backend.members("s") == {"a", "b"}
    assert backend.members("absent") == set()


def test_a_set_expires_from_its_creation(backend: Backend) -> None:
    backend.add_member("s", "a", ttl=0.3)
    backend.add_member("s", "b", ttl=60)  # a later ttl does not extend it

    wait_for(lambda: not backend.members("s"), "the set to expire")
    assert backend.add_member("s", "b", ttl=60) == (True, 1)
    assert backend.members("s") == {"b"}


def test_delete_removes_a_set(backend: Backend) -> None:
    backend.add_member("s", "a", ttl=60)
    backend.delete("s")

    assert backend.members("s") == set()
    assert backend.add_member("s", "a", ttl=60) == (True, 1)


# -- leases -------------------------------------------------------------------------------


def test_a_lease_is_held_by_one_owner(backend: Backend) -> None:
    token = backend.acquire_lease("job", "a", 60)
    assert token is not None

    assert backend.acquire_lease("job", "b", 60) is None
    assert backend.lease_holder("job") == ("a", token)
    # The holder acquiring again renews it and keeps its token.
    assert backend.acquire_lease("job", "a", 60) == token


def test_one_of_racing_owners_takes_a_lease(backend: Backend) -> None:
    tokens = race(
        [functools.partial(backend.acquire_lease, "job", f"o{i}", 60) for i in range(THREADS)]
    )

    winners = [i for i, t in enumerate(tokens) if t is not None]
    assert len(winners) == 1
    assert backend.lease_holder("job") == (f"o{winners[0]}", tokens[winners[0]])


def test_an_expired_lease_goes_to_another_owner_with_a_greater_token(backend: Backend) -> None:
    first = backend.acquire_lease("job", "a", 0.3)
    assert first is not None

    second = wait_for(lambda: backend.acquire_lease("job", "b", 60), "the lease to expire")

    assert second > first
    assert backend.lease_holder("job") == ("b", second)
    assert backend.renew_lease("job", "a", 60) is False


def test_renew_extends_the_holders_lease_only(backend: Backend) -> None:
    token = backend.acquire_lease("job", "a", 0.3)
    backend.acquire_lease("marker", "a", 0.3)
    assert backend.renew_lease("job", "b", 60) is False
    assert backend.renew_lease("job", "a", 60) is True

    # Past the first ttl (the lease taken with it has expired), the renewal holds.
    wait_for(lambda: backend.lease_holder("marker") is None, "the marker lease to expire")
    assert backend.lease_holder("job") == ("a", token)
    assert backend.renew_lease("absent", "a", 60) is False


def test_release_frees_the_lease_for_its_holder_only(backend: Backend) -> None:
    first = backend.acquire_lease("job", "a", 60)
    assert first is not None
    backend.release_lease("job", "b")
    assert backend.lease_holder("job") == ("a", first)

    backend.release_lease("job", "a")
    assert backend.lease_holder("job") is None
    second = backend.acquire_lease("job", "b", 60)
    assert second is not None and second > first
    backend.release_lease("absent", "a")


def test_keys_results_and_leases_are_apart(backend: Backend) -> None:
    """A task id, a key and a lease of the same name do not meet."""
    backend.store_result("x", b"result", final=True, expires=60)
    backend.put("x", b"value", 60)
    backend.acquire_lease("x", "a", 60)

    assert backend.get_result("x") == (b"result", True)
    assert backend.get("x") == b"value"
    backend.delete("x")
    assert backend.get_result("x") == (b"result", True)
    assert backend.lease_holder("x") is not None


def test_check_and_close_then_use_again(backend: Backend) -> None:
    backend.check()
    backend.put("k", b"1", 60)
    backend.close()

    assert backend.get("k") == b"1"
