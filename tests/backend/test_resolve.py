"""Choosing a state backend by URL, and its errors: unknown schemes, unreachable stores, TLS."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import pytest
import redis

from mqtasks import ConfigurationError
from mqtasks.backend import SCHEMES, Backend, resolve
from mqtasks.backend.postgres import PostgresBackend
from mqtasks.exceptions import BackendError
from mqtasks.transport.tls import TLSOptions
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys

from .conftest import drop_tables, postgres_url, require_postgres, table_prefix
from .test_behaviour import race

SECRET = "s3cret-Pa55word"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("memory://", "MemoryBackend"),
        ("redis://127.0.0.1:6379/0", "RedisBackend"),
        ("rediss://127.0.0.1:6379/0", "RedisBackend"),
        ("postgresql://u@127.0.0.1/db", "PostgresBackend"),
        ("postgres://u@127.0.0.1/db", "PostgresBackend"),
        ("REDIS://127.0.0.1:6379/0", "RedisBackend"),
    ],
)
def test_the_scheme_picks_the_backend_without_connecting(url: str, name: str) -> None:
    backend = resolve(url)

    assert type(backend).__name__ == name
    assert url.split(":", 1)[0].lower() in type(backend).schemes
    assert SCHEMES == (
        "memory",
        "postgres",
        "postgresql",
        "redis",
        "redis+sentinel",
        "rediss",
        "rediss+sentinel",
    )


def test_an_unknown_scheme_names_the_supported_ones_and_the_closest() -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve("redsi://127.0.0.1:6379/0")

    text = str(caught.value)
    assert "Unknown result backend 'redsi'" in text
    assert "Did you mean 'redis'?" in text
    assert all(scheme in text for scheme in SCHEMES)


def test_a_url_without_a_scheme_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="has no scheme") as caught:
        resolve(f"user:{SECRET}@localhost")

    assert SECRET not in str(caught.value)


UNREACHABLE = [
    f"redis://:{SECRET}@127.0.0.1:1/0",
    f"postgresql://postgres:{SECRET}@127.0.0.1:1/test",
]


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.check(),
        lambda b: b.get_result("t"),
        lambda b: b.store_result("t", b"x", final=True, expires=60),
        lambda b: b.wait_result("t", 1.0),
        lambda b: b.add_member("s", "m", ttl=60),
        lambda b: b.acquire_lease("l", "o", 60),
    ],
    ids=["check", "get_result", "store_result", "wait_result", "add_member", "lease"],
)
def test_an_unreachable_backend_raises_backend_error_without_the_password(
    url: str, call: Callable[[Backend], object]
) -> None:
    backend = resolve(url)
    try:
        with pytest.raises(BackendError) as caught:
            call(backend)
    finally:
        backend.close()

    text = str(caught.value)
    assert "127.0.0.1:1" in text
    assert SECRET not in text
    assert SECRET not in repr(backend)
    assert caught.value.__cause__ is not None


def test_migrating_an_unreachable_postgresql_raises_backend_error() -> None:
    backend = resolve(UNREACHABLE[1])

    with pytest.raises(BackendError, match="create the tables") as caught:
        backend.migrate()
    assert SECRET not in str(caught.value)


def test_tls_options_for_a_redis_url_without_tls_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="does not use TLS"):
        resolve("redis://127.0.0.1:6379/0", tls=TLSOptions(verify=False))


def test_tls_settings_in_a_rediss_url_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
        resolve("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none")


def test_two_memory_backends_are_apart() -> None:
    first, second = resolve("memory://"), resolve("memory://")
    first.put("k", b"1", 60)

    assert second.get("k") is None


# -- PostgreSQL: table names and migrations --------------------------------------------------


@pytest.mark.parametrize("prefix", ["Upper_", "with-dash_", "1digit_", "x" * 41, ""])
def test_a_table_prefix_postgresql_cannot_take_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="table_prefix"):
        resolve(f"postgresql://u:{SECRET}@127.0.0.1/db?table_prefix={prefix}")


def test_the_table_prefix_is_taken_off_the_url_given_to_libpq() -> None:
    backend = resolve("postgresql://u@127.0.0.1/db?sslmode=disable&table_prefix=app_")

    assert isinstance(backend, PostgresBackend)
    assert backend.table_prefix == "app_"
    assert backend.conninfo == "postgresql://u@127.0.0.1/db?sslmode=disable"


def test_spaces_in_libpq_options_reach_it_as_spaces() -> None:
    # libpq reads '+' in a URL's query as a plus sign, not as a space.
    backend = resolve(
        "postgresql://u@127.0.0.1/db?options=-c%20statement_timeout%3D5000&table_prefix=app_"
    )

    assert isinstance(backend, PostgresBackend)
    assert backend.conninfo == ("postgresql://u@127.0.0.1/db?options=-c%20statement_timeout%3D5000")


@pytest.mark.integration
def test_migrate_creates_the_tables_then_finds_them() -> None:
    prefix = table_prefix()
    backend = resolve(postgres_url(prefix))
    try:
        created = backend.migrate()
        again = backend.migrate()
    finally:
        backend.close()
        drop_tables(prefix)

    assert f"created table {prefix}results" in created
    assert all(line.startswith("created ") for line in created)
    assert f"table {prefix}results exists" in again
    assert all(line.endswith(" exists") for line in again)


@pytest.mark.integration
def test_workers_creating_the_tables_at_once_all_succeed() -> None:
    prefix = table_prefix()
    backends = [resolve(postgres_url(prefix)) for _ in range(6)]
    try:
        race(
            [
                functools.partial(b.store_result, "t", b"x", final=True, expires=60)
                for b in backends
            ],
            threads=6,
        )
        assert backends[0].get_result("t") == (b"x", True)
    finally:
        for b in backends:
            b.close()
        drop_tables(prefix)


# -- key prefixes -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["redis", "postgresql"])
def test_key_prefixes_keep_apps_apart_in_one_store(kind: str) -> None:
    if kind == "redis":
        require_broker("redis")
        tag = unique_name("backend")
        url = REDIS_URL
    else:
        require_postgres()
        tag = table_prefix()
        url = postgres_url(tag)
    first = resolve(url, key_prefix=f"{tag}-a:")
    second = resolve(url, key_prefix=f"{tag}-b:")
    try:
        first.store_result("t", b"a", final=True, expires=60)
        first.add_member("s", "m", ttl=60)

        assert second.get_result("t") is None
        assert second.store_result("t", b"b", final=True, expires=60) is True
        assert second.add_member("s", "m", ttl=60) == (True, 1)
        assert first.get_result("t") == (b"a", True)
    finally:
        first.close()
        second.close()
        if kind == "redis":
            delete_keys(tag)
        else:
            drop_tables(tag)


@pytest.mark.integration
def test_a_result_stored_in_another_redis_database_does_not_wake_a_waiter() -> None:
    """Pub/sub channels are shared by every database of a server; keys are not."""
    require_broker("redis")
    prefix = unique_name("backend") + ":"
    here_url = REDIS_URL
    there_url = REDIS_URL.rsplit("/", 1)[0] + "/10"
    here, there = resolve(here_url, key_prefix=prefix), resolve(there_url, key_prefix=prefix)
    timer = threading.Timer(0.1, there.store_result, ["t", b"x"], {"final": True, "expires": 60})
    try:
        timer.start()
        assert here.wait_result("t", timeout=0.6) is None
    finally:
        timer.join()
        here.close()
        there.close()
        for url in (here_url, there_url):
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
            client.close()
