"""Writes fenced by a lease, in every state backend (memory, Redis, PostgreSQL):
claim_fenced and put_fenced write only while the lease is live with the caller's token."""

from __future__ import annotations

import threading
import time

from mqtasks.backend import Backend
from tests._helpers.wait import wait_for


def _take_over(backend: Backend, lease: str, first: int) -> int:
    """Wait until ``lease`` (held by ``a`` with token ``first``) expires; ``b`` takes it."""
    second = wait_for(lambda: backend.acquire_lease(lease, "b", 60), "the lease to expire")
    assert second > first
    return second


def _refused(backend: Backend, token: int, lease: str = "leader") -> None:
    """A claim of ``t1`` with ``token`` is fenced out, and ``t1`` stays absent."""
    assert backend.claim_fenced(lease, token, ["t1"], 60) is None
    assert backend.get("t1") is None


def test_a_holder_claims_absent_keys_and_sees_an_earlier_holders_claims(
    backend: Backend,
) -> None:
    first = backend.acquire_lease("leader", "a", 0.3)
    assert first is not None
    assert backend.claim_fenced("leader", first, ["t1", "t2"], 60) == [first, first]
    # Claiming again (the same holder) changes nothing; a key twice in one call is one claim.
    assert backend.claim_fenced("leader", first, ["t2", "t3", "t3"], 60) == [first] * 3

    second = _take_over(backend, "leader", first)
    assert backend.claim_fenced("leader", second, ["t1", "t4", "t3"], 60) == [
        first,
        second,
        first,
    ]
    # A claim reads back as the token in decimal ASCII.
    assert backend.get("t1") == str(first).encode()
    assert backend.get("t4") == str(second).encode()
    # Holding the lease, an empty claim is an empty list (not None).
    assert backend.claim_fenced("leader", second, [], 60) == []


def test_a_holder_whose_lease_expired_claims_and_writes_nothing(backend: Backend) -> None:
    first = backend.acquire_lease("leader", "a", 0.3)
    assert first is not None
    wait_for(lambda: backend.lease_holder("leader") is None, "the lease to expire")

    # Expired, not yet taken: fenced out all the same.
    assert backend.claim_fenced("leader", first, ["t1", "t2"], 60) is None
    assert backend.claim_fenced("leader", first, [], 60) is None
    assert backend.put_fenced("leader", first, "state", b"stale", 60) is False
    assert backend.get("t1") is None and backend.get("t2") is None
    assert backend.get("state") is None

    second = backend.acquire_lease("leader", "b", 60)
    assert second is not None and second > first
    # Taken by another: the old token is refused, the new one is not.
    _refused(backend, first)
    assert backend.claim_fenced("leader", second, ["t1"], 60) == [second]


def test_a_wrong_token_or_a_lease_never_held_claims_nothing(backend: Backend) -> None:
    token = backend.acquire_lease("leader", "a", 60)
    assert token is not None

    _refused(backend, token + 1)
    _refused(backend, token - 1)
    _refused(backend, token, lease="other")
    assert backend.claim_fenced("leader", token, ["t1"], 60) == [token]


def test_claims_expire_after_their_ttl_then_count_as_absent(backend: Backend) -> None:
    first = backend.acquire_lease("leader", "a", 60)
    assert first is not None
    assert backend.claim_fenced("leader", first, ["short", "long"], 0.3) == [first, first]
    backend.put("long", str(first).encode(), 60)  # the same claim, kept longer

    wait_for(lambda: backend.get("short") is None, "the claim to expire")

    backend.release_lease("leader", "a")
    second = backend.acquire_lease("leader", "b", 60)
    assert second is not None and second > first
    assert backend.claim_fenced("leader", second, ["short", "long"], 60) == [second, first]
    assert backend.get("short") == str(second).encode()


def test_put_fenced_writes_only_while_the_lease_is_live_with_the_token(
    backend: Backend,
) -> None:
    first = backend.acquire_lease("leader", "a", 60)
    assert first is not None

    def put(token: int, value: bytes, ttl: float = 60) -> tuple[bool, bytes | None]:
        return backend.put_fenced("leader", token, "state", value, ttl), backend.get("state")

    assert put(first, b"one") == (True, b"one")
    assert put(first, b"two") == (True, b"two")  # replaced
    assert put(first + 1, b"wrong") == (False, b"two")

    backend.release_lease("leader", "a")
    assert put(first, b"released") == (False, b"two")
    second = backend.acquire_lease("leader", "b", 60)
    assert second is not None
    assert put(first, b"stale") == (False, b"two")
    assert put(second, b"three", 0.3) == (True, b"three")
    wait_for(lambda: backend.get("state") is None, "the value to expire")


def test_a_frozen_holder_and_its_successor_never_both_claim_a_key(backend: Backend) -> None:
    """The holder renews, claiming one key at a time, and now and then freezes past its
    lease's ttl, unaware (it goes on with its token); another owner waits to take the
    lease, then claims every key. No key is claimed by both, and no claim of the first
    started after the takeover went in."""
    keys = [f"tick{i}" for i in range(120)]
    first = backend.acquire_lease("leader", "a", 0.2)
    assert first is not None
    taken_over = threading.Event()
    done = threading.Event()
    first_claims: dict[str, int | None] = {}
    after_takeover: list[list[int] | None] = []
    second_claims: list[int] = []
    second: list[int] = []
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            for i, key in enumerate(keys):
                backend.renew_lease("leader", "a", 0.2)
                seen = taken_over.is_set()
                claimed = backend.claim_fenced("leader", first, [key], 60)
                first_claims[key] = None if claimed is None else claimed[0]
                if seen:
                    after_takeover.append(claimed)
                if i % 15 == 14:
                    time.sleep(0.3)  # frozen past the ttl
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def successor() -> None:
        try:
            token = None
            while token is None:
                token = backend.acquire_lease("leader", "b", 60)
                if token is None:
                    time.sleep(0.01)
            second.append(token)
            taken_over.set()
            claimed = backend.claim_fenced("leader", token, keys, 60)
            assert claimed is not None
            second_claims.extend(claimed)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=holder), threading.Thread(target=successor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert done.is_set() and second and second[0] > first

    assert all(claimed is None for claimed in after_takeover)
    mine = {key for key, token in first_claims.items() if token == first}
    assert mine, "the holder claimed nothing before it lost its lease"
    for key, holder_token in zip(keys, second_claims, strict=True):
        assert holder_token == (first if key in mine else second[0]), key
        assert backend.get(key) == str(holder_token).encode()
    # The first holder claimed keys for itself or was fenced out; it never saw another's claim.
    assert set(first_claims.values()) <= {None, first}, first_claims


def test_two_thousand_keys_are_claimed_in_one_call(backend: Backend) -> None:
    token = backend.acquire_lease("leader", "a", 60)
    assert token is not None
    keys = [f"periodic:app:sent:periodic:job:{i}" for i in range(2000)]
    assert backend.claim_fenced("leader", token, keys[:500], 60) == [token] * 500

    backend.release_lease("leader", "a")
    second = backend.acquire_lease("leader", "b", 60)
    assert second is not None
    claimed = backend.claim_fenced("leader", second, keys, 60)
    assert claimed == [token] * 500 + [second] * 1500
    assert backend.get(keys[-1]) == str(second).encode()
