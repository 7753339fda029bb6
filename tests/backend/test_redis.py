"""The Redis backend's waits and batched writes, counted on a redis-server of this module's own.

The server is private so that its command statistics (``INFO commandstats``)
count this test's commands alone, and a ``SCRIPT FLUSH`` touches no one else.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mqtasks.backend import resolve
from mqtasks.backend.base import ResultWrite
from mqtasks.backend.redis import RedisBackend
from tests._helpers.servers import start_redis, stop

pytestmark = pytest.mark.integration

#: Waiters of the many-waiters test.
WAITERS = 32


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a redis-server of this module's own."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed", pytrace=False)
    proc, port = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield port
    stop(proc)


@pytest.fixture
def probe(port: int) -> Iterator[redis.Redis[bytes]]:
    """A client of the private server on the backend's database, all emptied after the test."""
    client: redis.Redis[bytes] = redis.Redis(port=port, db=3)
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def backend(port: int) -> Iterator[RedisBackend]:
    """A backend on database 3 of the private server."""
    made = resolve(f"redis://127.0.0.1:{port}/3", key_prefix="app:")
    assert isinstance(made, RedisBackend)
    yield made
    made.close()


def commands(probe: redis.Redis[bytes]) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``, the probe's own left out."""
    stats = probe.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {n: c for n, c in calls.items() if n != "info" and not n.startswith("config")}


def test_wait_result_costs_one_command_when_the_result_is_stored(
    backend: RedisBackend, probe: redis.Redis[bytes]
) -> None:
    # Given a stored final result, and the backend's connection made
    backend.store_result("t", b"x", final=True, expires=60)
    backend.check()
    probe.config_resetstat()

    # When a wait asks for it
    got = backend.wait_result("t", 30)

    # Then one blocking command, which returned at once, was all it took
    assert got == b"x"
    assert commands(probe) == {"blmove": 1}


def test_a_wait_that_times_out_is_one_command_too(
    backend: RedisBackend, probe: redis.Redis[bytes]
) -> None:
    backend.check()
    probe.config_resetstat()

    assert backend.wait_result("never", 0.2) is None
    assert commands(probe) == {"blmove": 1}
    # A zero timeout reads without blocking (Redis would read a zero block as forever).
    assert backend.wait_result("never", 0) is None
    assert commands(probe) == {"blmove": 1, "lindex": 1}


def test_many_waiters_of_one_task_all_wake_and_the_record_stays(
    backend: RedisBackend, probe: redis.Redis[bytes]
) -> None:
    # Given many threads waiting for one task
    barrier = threading.Barrier(WAITERS + 1)
    got: list[bytes | None] = []

    def wait() -> None:
        barrier.wait(10)
        got.append(backend.wait_result("t", 30))

    threads = [threading.Thread(target=wait) for _ in range(WAITERS)]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    deadline = time.monotonic() + 10
    while probe.info("clients")["blocked_clients"] < WAITERS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probe.info("clients")["blocked_clients"] == WAITERS

    # When the final record is stored
    started = time.monotonic()
    assert backend.store_result("t", b"done", final=True, expires=60) is True
    for thread in threads:
        thread.join(20)

    # Then every waiter woke with it, well before its timeout, and it is still there
    assert got == [b"done"] * WAITERS
    assert time.monotonic() - started < 10
    assert probe.lrange(backend.done_key("t"), 0, -1) == [b"done"]
    assert backend.wait_result("t", 30) == b"done"


def test_the_keys_are_in_the_urls_database_under_the_prefix(
    backend: RedisBackend, probe: redis.Redis[bytes], port: int
) -> None:
    # A non-final record makes no list: nothing to wake
    backend.store_result("t", b"started", final=False, expires=60)
    assert probe.keys() == [b"app:result:t"]
    backend.store_result("t", b"x", final=True, expires=30)

    assert sorted(probe.keys()) == [b"app:done:t", b"app:result:t"]
    db0: redis.Redis[bytes] = redis.Redis(port=port)
    try:
        assert db0.keys() == []
    finally:
        db0.close()
    # The list expires with the result
    assert 29_000 < probe.pttl(b"app:done:t") <= 30_000
    backend.forget("t")
    assert probe.keys() == []
    assert backend.wait_result("t", 0) is None


def test_a_wait_longer_than_the_socket_timeout_blocks_in_slices(
    port: int, probe: redis.Redis[bytes]
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{port}/3", key_prefix="app:", socket_timeout=0.4)
    try:
        backend.check()
        probe.config_resetstat()
        # A wait past the socket's timeout ends at its own, without a socket error
        started = time.monotonic()
        assert backend.wait_result("never", 1.0) is None
        assert 1.0 <= time.monotonic() - started < 5
        assert commands(probe)["blmove"] >= 3

        # and a record stored after the first slice wakes it
        timer = threading.Timer(
            0.7, backend.store_result, ["t", b"x"], {"final": True, "expires": 60}
        )
        timer.start()
        try:
            assert backend.wait_result("t", 10) == b"x"
        finally:
            timer.join()
    finally:
        backend.close()


def test_store_results_is_one_round_trip_and_loads_a_flushed_script(
    backend: RedisBackend, probe: redis.Redis[bytes]
) -> None:
    # Given a server that has forgotten the store script
    backend.store_result("seen", b"x", final=True, expires=60)
    probe.script_flush()
    probe.config_resetstat()

    # When a batch is stored
    written = backend.store_results(
        [ResultWrite(f"t{i}", b"%d" % i, True, 60) for i in range(4)]
        + [ResultWrite("seen", b"y", True, 60)]
    )

    # Then the refused calls ran again once it was loaded
    assert written == [True] * 4 + [False]
    assert backend.get_results(["t0", "t3", "seen"]) == [(b"0", True), (b"3", True), (b"x", True)]
    stats = commands(probe)
    assert stats["evalsha"] == 10  # five refused, five run
    assert stats["script|load"] == 1

    # And with the script known, a batch is its calls alone
    probe.config_resetstat()
    assert backend.store_results(
        [ResultWrite("u", b"1", True, 60), ResultWrite("v", b"2", False, 60)]
    ) == [
        True,
        True,
    ]
    assert commands(probe) == {
        "evalsha": 2,
        "getrange": 2,
        "set": 2,
        "del": 1,
        "rpush": 1,
        "pexpire": 1,
        "publish": 1,
    }
