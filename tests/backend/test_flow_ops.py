"""The flow-control operations of every state backend (memory, Redis, PostgreSQL):
the token bucket (take_token, peek_tokens) and lease-based slots (acquire_slot,
renew_slots, release_slot, slots_held)."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mqtasks.backend import Backend
from mqtasks.backend.base import BucketState, token_bucket_step
from mqtasks.backend.redis import RedisBackend
from tests._helpers.servers import start_redis, stop
from tests._helpers.wait import wait_for
from tests.backend.test_behaviour import THREADS, race

# -- the token bucket -----------------------------------------------------------------------


def test_the_reference_step_takes_reserves_then_refuses_on_a_schedule() -> None:
    step = functools.partial(token_bucket_step, rate=10.0, capacity=2.0, max_wait=0.25)
    state = None
    grants = []
    for _ in range(6):
        grant, state, keep = step(state, 100.0)
        grants.append(grant)
    assert [g.granted for g in grants] == [True, True, True, True, False, False]
    assert [round(g.wait, 6) for g in grants] == [0, 0, 0.1, 0.2, 0.3, 0.4]
    assert state is not None and state.tokens == pytest.approx(-2.0)
    assert keep == pytest.approx(4 * 0.1 + 1.0)  # refilled to 2 tokens in 0.4 s, kept 1 s more
    assert [g.taken for g in grants] == [1, 1, 1, 1, 0, 0]
    # A second later the bucket is full again: a token at once.
    grant, state, _ = step(state, 101.0)
    assert grant.granted and grant.wait == 0 and grant.tokens == pytest.approx(1.0)
    assert state is not None and state[:2] == BucketState(1.0, 101.0, 0.0)[:2]
    assert state.queued == pytest.approx(100.4)


def test_a_bucket_grants_its_burst_then_reserves_short_waits_then_defers(
    backend: Backend,
) -> None:
    # Two tokens a second, so that the time the calls themselves take (a loaded
    # machine: tens of milliseconds) stays well inside each bound; ``spent()``
    # bounds how long the bucket has been refilling.
    take = functools.partial(backend.take_token, "flow:rate:t", rate=2.0, capacity=2.0)
    start = time.monotonic()

    def spent() -> float:
        return time.monotonic() - start

    first, second = take(max_wait=1.25), take(max_wait=1.25)
    assert first.granted and second.granted and first.wait == 0 and second.wait == 0
    reserved = take(max_wait=1.25)
    assert reserved.granted and 0.5 - spent() - 0.01 <= reserved.wait <= 0.5
    refused = take(max_wait=0.25)
    assert not refused.granted and 1.0 - spent() - 0.01 <= refused.wait <= 1.0
    # The next refused caller comes back one interval after the first, not with it.
    later = take(max_wait=0.25)
    assert not later.granted and later.wait == pytest.approx(refused.wait + 0.5, abs=0.15)
    # In debt by the reserved token, less what refilled since the start.
    tokens = backend.peek_tokens("flow:rate:t", rate=2.0, capacity=2.0)
    assert tokens <= -1.0 + 2.0 * spent() + 0.02
    # Past the two deferred callers' places (1.0 and 1.5 s): a token for a new one.
    time.sleep(max(0.0, 1.75 - spent()))
    assert take(max_wait=0).granted


def test_more_tokens_at_once_come_only_from_the_upper_half_of_the_bucket(
    backend: Backend,
) -> None:
    take = functools.partial(backend.take_token, "flow:rate:n", rate=0.01, capacity=10.0)
    first = take(max_wait=0, count=16)
    assert first.granted and first.taken == 5 and first.tokens == pytest.approx(5.0)
    # At half, one at a time: the last tokens are shared token by token.
    assert [take(max_wait=0, count=16).taken for _ in range(6)] == [1, 1, 1, 1, 1, 0]


def test_an_absent_bucket_is_full_and_a_full_bucket_is_not_kept(backend: Backend) -> None:
    assert backend.peek_tokens("flow:rate:none", rate=5.0, capacity=3.0) == 3.0
    # One token in 0.5 s: the peek comes well before, even on a loaded machine.
    backend.take_token("flow:rate:b", rate=2.0, capacity=1.0, max_wait=0)
    assert backend.peek_tokens("flow:rate:b", rate=2.0, capacity=1.0) < 1.0
    wait_for(
        lambda: backend.peek_tokens("flow:rate:b", rate=2.0, capacity=1.0) == 1.0,
        "the bucket to refill",
    )


def test_racing_takers_share_the_burst_exactly(backend: Backend) -> None:
    take = functools.partial(
        backend.take_token, "flow:rate:race", rate=0.01, capacity=5.0, max_wait=0
    )
    grants = race([take] * (THREADS * 3))
    assert sum(g.granted for g in grants) == 5
    waits = sorted(g.wait for g in grants if not g.granted)
    # Every refused caller has a place of its own in the schedule (100 s apart).
    gaps = [b - a for a, b in itertools.pairwise(waits)]
    assert min(gaps) == pytest.approx(100.0, abs=1.0)


def test_buckets_are_separate_per_key(backend: Backend) -> None:
    for key in ("flow:rate:t:1", "flow:rate:t:2"):
        assert backend.take_token(key, rate=0.01, capacity=1.0, max_wait=0).granted
        assert not backend.take_token(key, rate=0.01, capacity=1.0, max_wait=0).granted


# -- slots ------------------------------------------------------------------------------------


def test_slots_are_taken_up_to_the_limit_and_freed_by_release(backend: Backend) -> None:
    acquire = functools.partial(backend.acquire_slot, "flow:slots:t", limit=2, ttl=30)
    assert acquire("a") == (True, 1)
    assert acquire("b") == (True, 2)
    assert acquire("c") == (False, 2)
    assert acquire("a") == (True, 2)  # its own slot: renewed, not a second one
    assert backend.slots_held("flow:slots:t") == 2
    backend.release_slot("flow:slots:t", "a")
    backend.release_slot("flow:slots:t", "nobody")  # holds none: nothing happens
    assert backend.slots_held("flow:slots:t") == 1
    assert acquire("c") == (True, 2)
    assert backend.slots_held("flow:slots:other") == 0


def test_a_slot_not_released_frees_itself_after_its_ttl(backend: Backend) -> None:
    assert backend.acquire_slot("flow:slots:dead", "dead-worker", limit=1, ttl=0.5)[0]
    assert backend.acquire_slot("flow:slots:dead", "alive", limit=1, ttl=5)[0] is False
    wait_for(lambda: backend.slots_held("flow:slots:dead") == 0, "the slot to expire")
    assert backend.acquire_slot("flow:slots:dead", "alive", limit=1, ttl=5) == (True, 1)


def test_renewed_slots_outlive_their_first_ttl(backend: Backend) -> None:
    key = "flow:slots:renew"
    assert backend.acquire_slot(key, "a", limit=3, ttl=1.2)[0]
    assert backend.acquire_slot(key, "b", limit=3, ttl=1.2)[0]
    time.sleep(0.3)  # renewed well within the first ttl, even on a loaded machine
    assert backend.renew_slots(key, ["a", "b", "never"], 3.0) == 2
    time.sleep(1.0)  # past the first ttl
    assert backend.slots_held(key) == 2
    assert backend.renew_slots(key, [], 3.0) == 0
    backend.release_slot(key, "a")
    assert backend.renew_slots(key, ["a"], 3.0) == 0


def test_racing_acquirers_never_exceed_the_limit(backend: Backend) -> None:
    jobs: list[Callable[[], tuple[bool, int]]] = [
        functools.partial(backend.acquire_slot, "flow:slots:race", f"o{i}", limit=3, ttl=30)
        for i in range(THREADS * 3)
    ]
    results = race(jobs)
    assert sum(acquired for acquired, _ in results) == 3
    assert all(held <= 3 for _, held in results)
    assert backend.slots_held("flow:slots:race") == 3


@pytest.mark.integration
def test_the_redis_bucket_loads_its_script_again_after_a_flush(tmp_path: Path) -> None:
    proc, port = start_redis(tmp_path)
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0")
    try:
        assert backend.take_token("b", rate=1.0, capacity=2.0, max_wait=0).granted
        backend.client().script_flush()  # as after a restart: the script is unknown
        grant = backend.take_token("b", rate=1.0, capacity=2.0, max_wait=0)
        assert grant.granted and grant.tokens < 1
    finally:
        backend.close()
        stop(proc)
