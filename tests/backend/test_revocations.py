"""Revocations in every state backend: stored with an expiry, listed, removed, and
announced to watches (memory, the local Redis, the local PostgreSQL)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import psycopg
import pytest

from mqtasks.backend import Backend, resolve
from mqtasks.backend.base import Revocation
from mqtasks.backend.postgres import PostgresBackend
from tests._helpers.wait import wait_for
from tests.backend.conftest import POSTGRES_URL, drop_tables, postgres_url, table_prefix


class Heard:
    """A revocation listener that keeps what it was told."""

    def __init__(self) -> None:
        self.revoked: list[Revocation] = []
        self.removed: list[str] = []
        self.connected = 0
        self.lock = threading.Lock()

    def on_revocation(self, revocation: Revocation) -> None:
        with self.lock:
            self.revoked.append(revocation)

    def on_revocation_removed(self, task_id: str) -> None:
        with self.lock:
            self.removed.append(task_id)

    def on_watch_connected(self) -> None:
        with self.lock:
            self.connected += 1

    def ids(self) -> list[str]:
        with self.lock:
            return [r.task_id for r in self.revoked]


@contextlib.contextmanager
def watching(backend: Backend) -> Iterator[Heard]:
    """A watch of ``backend``, listening already; closed at the end of the block."""
    heard = Heard()
    watch = backend.watch_revocations(heard)
    try:
        wait_for(lambda: heard.connected, "the watch to listen")
        yield heard
    finally:
        watch.close()


def live(backend: Backend) -> dict[str, Revocation]:
    return {r.task_id: r for r in backend.revocations()}


def test_a_revocation_is_listed_with_its_flag_and_time_left(backend: Backend) -> None:
    assert backend.revocations() == []

    backend.add_revocation("t1", terminate=False, ttl=60)
    backend.add_revocation("t2", terminate=True, ttl=60)

    found = live(backend)
    assert set(found) == {"t1", "t2"}
    assert found["t1"].terminate is False
    assert found["t2"].terminate is True
    assert all(0 < r.expires <= 60 for r in found.values())


def test_one_revocation_is_read_by_id(backend: Backend) -> None:
    backend.add_revocation("t", terminate=True, ttl=60)
    backend.add_revocation("short", terminate=False, ttl=0.3)

    found = backend.revocation("t")
    assert found is not None
    assert (found.task_id, found.terminate) == ("t", True)
    assert 0 < found.expires <= 60
    assert backend.revocation("never") is None

    backend.remove_revocation("t")
    assert backend.revocation("t") is None
    wait_for(lambda: backend.revocation("short") is None, "the short revocation to expire")


def test_revoking_again_replaces_the_flag_and_expiry(backend: Backend) -> None:
    backend.add_revocation("t", terminate=True, ttl=5)
    backend.add_revocation("t", terminate=False, ttl=120)

    found = live(backend)
    assert list(found) == ["t"]
    assert found["t"].terminate is False
    assert found["t"].expires > 60


def test_a_removed_revocation_is_gone_and_others_stay(backend: Backend) -> None:
    backend.add_revocation("gone", terminate=True, ttl=60)
    backend.add_revocation("kept", terminate=False, ttl=60)

    backend.remove_revocation("gone")
    backend.remove_revocation("never-revoked")  # harmless

    assert set(live(backend)) == {"kept"}


def test_a_revocation_expires(backend: Backend) -> None:
    backend.add_revocation("short", terminate=True, ttl=0.3)
    backend.add_revocation("long", terminate=False, ttl=60)

    wait_for(lambda: "short" not in live(backend), "the short revocation to expire")
    assert set(live(backend)) == {"long"}


def test_a_watch_hears_revocations_and_removals(backend: Backend) -> None:
    # Given a watch, listening
    with watching(backend) as heard:
        # When a task is revoked, and another revoked then un-revoked
        backend.add_revocation("a", terminate=True, ttl=60)
        backend.add_revocation("b", terminate=False, ttl=60)
        backend.remove_revocation("b")

        # Then the watch hears each, in order
        wait_for(lambda: heard.removed, "the removal to be announced")
        assert heard.ids() == ["a", "b"]
        assert heard.revoked[0].terminate is True
        assert 0 < heard.revoked[0].expires <= 60
        assert heard.removed == ["b"]

    # Closed, it hears nothing more
    backend.add_revocation("c", terminate=False, ttl=60)
    assert "c" in live(backend)
    assert "c" not in heard.ids()


def test_watches_of_two_backends_on_one_store_both_hear(backend: Backend) -> None:
    """Two workers (two backend objects of one store) hear the same revocation."""
    # memory:// is one store per object; the others are shared by URL and prefix.
    shared = backend.url.startswith("memory")
    other = backend if shared else resolve(backend.url, key_prefix=backend.key_prefix)
    try:
        with watching(backend) as first, watching(other) as second:
            other.add_revocation("t", terminate=False, ttl=60)
            wait_for(lambda: first.ids() == ["t"] and second.ids() == ["t"], "both to hear it")
    finally:
        if other is not backend:
            other.close()


@pytest.mark.integration
def test_postgres_apps_with_other_key_prefixes_do_not_share_revocations() -> None:
    prefix = table_prefix()
    url = postgres_url(prefix)
    mine, theirs = resolve(url, key_prefix="mine:"), resolve(url, key_prefix="theirs:")
    try:
        with watching(mine) as heard:
            theirs.add_revocation("other", terminate=False, ttl=60)
            mine.add_revocation("own", terminate=False, ttl=60)
            wait_for(lambda: heard.ids(), "the own revocation to be announced")
            assert heard.ids() == ["own"]
        assert set(live(mine)) == {"own"}
        assert set(live(theirs)) == {"other"}
    finally:
        mine.close()
        theirs.close()
        drop_tables(prefix)


@pytest.mark.integration
def test_a_postgres_watch_listens_again_after_its_connection_is_lost() -> None:
    # Given a watch listening on PostgreSQL
    prefix = table_prefix()
    backend = resolve(postgres_url(prefix))
    assert isinstance(backend, PostgresBackend)
    try:
        with watching(backend) as heard:
            # When the server drops its connection
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                    [f'LISTEN "{backend.revocation_channel}"'],
                )

            # Then it listens again, says so (the listener reads the store again),
            # and hears what is revoked afterwards
            wait_for(lambda: heard.connected >= 2, "the watch to listen again")
            backend.add_revocation("after", terminate=False, ttl=60)
            wait_for(lambda: heard.ids() == ["after"], "the revocation after the loss")
    finally:
        backend.close()
        drop_tables(prefix)
