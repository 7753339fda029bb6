"""Revoking tasks: app.revoke(), the REVOKED state, the Revocations a worker owns, revoked
tasks dead-lettered by workers (memory, and the real brokers with the real backends),
``--terminate``, replay, and ``mqtasks revoke``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from mqtasks import App, TaskFailed
from mqtasks.backend.base import Revocation
from mqtasks.backend.memory import MemoryBackend
from mqtasks.dlq import DeadLetter
from mqtasks.exceptions import BackendError, ConfigurationError
from mqtasks.result import PENDING, REVOKED, SUCCEEDED
from mqtasks.revoke import Revocations, clear_revocation, revoke
from mqtasks.testing import drain, running_worker
from mqtasks.worker import Worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.cli import MQTASKS, clean_env, run
from tests._helpers.redis import delete_keys
from tests._helpers.servers import free_port
from tests._helpers.wait import wait_for
from tests.backend.conftest import backend_app_options

# -- app.revoke and the REVOKED state (memory) --------------------------------------------


@pytest.fixture
def mem(make_app: Callable[..., App]) -> App:
    """An app on memory:// with a memory:// result backend."""
    return make_app("memory://", backend="memory://")


def new_id() -> str:
    return str(uuid.uuid4())


def test_revoke_without_a_backend_says_how_to_set_one(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")
    with pytest.raises(ConfigurationError, match=r"no result backend.*MQTASKS_BACKEND_URL"):
        app.revoke("some-id")


@pytest.mark.parametrize("bad", ["", "x" * 256, "a\x00b"])
def test_a_task_id_that_cannot_be_one_is_refused(mem: App, bad: str) -> None:
    with pytest.raises(ValueError, match="1 to 255 characters"):
        mem.revoke(bad)
    assert mem.backend.revocations() == []


def test_a_task_id_that_is_no_string_is_refused(mem: App) -> None:
    with pytest.raises(TypeError, match="not int"):
        mem.revoke(42)  # type: ignore[arg-type]


def test_revoking_an_id_never_sent_is_harmless(mem: App) -> None:
    task_id = "x" * 255
    assert mem.revoke(task_id) == REVOKED
    assert mem.handle(task_id).state == REVOKED
    assert [r.task_id for r in mem.backend.revocations()] == [task_id]


def test_a_pending_task_reads_revoked_at_once(mem: App) -> None:
    @mem.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(1, 2)
    assert handle.state == PENDING

    assert mem.revoke(handle.id) == REVOKED

    assert handle.state == REVOKED
    assert handle.ready() and handle.failed()
    with pytest.raises(TaskFailed) as raised:
        handle.get(timeout=5)
    assert raised.value.state == REVOKED and raised.value.reason == "revoked"


def test_a_handle_revokes_its_task(mem: App) -> None:
    """handle.revoke() (mqtasks/handle.py, wired by the lead) is app.revoke(handle.id)."""

    @mem.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(1, 2)

    assert handle.revoke(terminate=True) == REVOKED  # type: ignore[attr-defined]

    assert handle.state == REVOKED
    assert handle.outcome().task == add.name  # type: ignore[union-attr]
    [revocation] = mem.backend.revocations()
    assert (revocation.task_id, revocation.terminate) == (handle.id, True)


def test_a_task_that_succeeded_does_not_turn_revoked(mem: App) -> None:
    @mem.task
    def add(x: int, y: int) -> int:
        return x + y

    handle = add.delay(1, 2)
    with running_worker(mem):
        assert handle.get(timeout=20) == 3

    assert mem.revoke(handle.id) == SUCCEEDED
    assert handle.state == SUCCEEDED
    assert handle.get(timeout=5) == 3


def test_clearing_a_revocation_forgets_it_and_its_revoked_outcome(mem: App) -> None:
    task_id = new_id()
    mem.revoke(task_id)

    clear_revocation(mem, task_id)

    assert mem.backend.revocations() == []
    assert mem.handle(task_id).state == PENDING


# -- Revocations, the worker's view (memory, the local Redis and PostgreSQL) ---------------


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def backend_options(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """App arguments for each result backend; the test's keys or tables deleted after it."""
    with backend_app_options(request.param) as options:
        yield options


@pytest.fixture
def make_revocations(
    make_app: Callable[..., App], backend_options: dict[str, Any]
) -> Iterator[Callable[..., tuple[App, Revocations]]]:
    """A factory: a started Revocations of a worker of ``app`` (by default a new app on
    the backend, memory:// broker); stopped, and the apps closed, at the end."""
    made: list[tuple[App, Revocations]] = []

    def make(app: App | None = None, **overrides: Any) -> tuple[App, Revocations]:
        if app is None:
            app = make_app("memory://", **backend_options, **overrides)
        revocations = Revocations(Worker(app))
        revocations.start()
        made.append((app, revocations))
        return app, revocations

    yield make
    for app, revocations in made:
        revocations.stop()
        app.close()


def other_app(app: App, make_app: Callable[..., App]) -> App:
    """Another app object on ``app``'s backend (as another process has); memory: ``app``."""
    if app.settings.backend_url == "memory://":
        return app
    return make_app("memory://", **_backend_of(app))


def _backend_of(app: App) -> dict[str, Any]:
    s = app.settings
    return {"backend": s.backend_url, "backend_key_prefix": s.backend_key_prefix}


def test_revocations_hear_a_revoke_made_elsewhere(
    make_revocations: Callable[..., tuple[App, Revocations]], make_app: Callable[..., App]
) -> None:
    # Given a worker's revocations, started
    app, revocations = make_revocations()
    task_id = new_id()
    assert not revocations.is_revoked(task_id)

    # When another process revokes a task
    other_app(app, make_app).revoke(task_id)

    # Then the worker hears of it
    wait_for(lambda: revocations.is_revoked(task_id), "the revocation to reach the worker")
    assert not revocations.is_revoked(new_id())


def test_revocations_read_at_start_what_was_revoked_before(
    make_app: Callable[..., App],
    backend_options: dict[str, Any],
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> None:
    # Given a task revoked before any worker started
    app = make_app("memory://", **backend_options)
    task_id = new_id()
    app.revoke(task_id)

    # When a worker's revocations start (memory: on the same app; else another app object)
    _, revocations = make_revocations(other_app(app, make_app))

    # Then they know it at once
    assert revocations.is_revoked(task_id)
    assert len(revocations) == 1


def drop_unannounced(app: App, task_id: str) -> None:
    """Delete ``task_id``'s revocation from the store without announcing it (a removal
    whose notice has not reached the worker yet)."""
    backend: Any = app.backend
    url = app.settings.backend_url or ""
    if url.startswith("memory"):
        with backend._cond:
            del backend._revoked[task_id]
    elif url.startswith("redis"):
        for key in backend.revocation_keys:
            backend.client().zrem(key, task_id)
    else:
        with backend.pool().connection() as conn:
            conn.execute(backend._sql["unrevoke"], [backend._id(task_id)])


def known_revocation(
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> tuple[App, Revocations, str]:
    """A worker's started revocations, and the id of a task revoked since, which they know."""
    app, revocations = make_revocations()
    task_id = new_id()
    app.revoke(task_id)
    wait_for(lambda: revocations.is_revoked(task_id), "the revocation to arrive")
    return app, revocations, task_id


def test_a_revoked_id_is_confirmed_in_the_store_so_a_fresh_replay_runs(
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> None:
    # Given a revocation the worker knows
    app, revocations, task_id = known_revocation(make_revocations)

    # When it is removed from the store, and the notice has not arrived
    drop_unannounced(app, task_id)

    # Then the worker does not refuse the task (the store is asked for a revoked id)
    assert not revocations.is_revoked(task_id)
    assert len(revocations) == 0


def test_a_cleared_revocation_reaches_the_worker(
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> None:
    app, revocations, task_id = known_revocation(make_revocations)

    clear_revocation(app, task_id)

    wait_for(lambda: not revocations.is_revoked(task_id), "the removal to arrive")
    assert app.handle(task_id).state == PENDING


def test_a_revocation_expires_in_the_worker(
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> None:
    app, revocations = make_revocations(revoke_expires=0.5)
    task_id = new_id()
    app.revoke(task_id)
    assert any(r.task_id == task_id for r in app.backend.revocations())

    wait_for(lambda: not revocations.is_revoked(task_id), "the revocation to expire")


def test_revocations_start_without_their_backend_and_say_so(
    make_app: Callable[..., App],
) -> None:
    """A backend down when a worker starts: it starts all the same (an error logged),
    and its watch keeps trying to connect."""
    port = free_port()
    app = make_app("memory://", backend=f"redis://:pw-not-shown@127.0.0.1:{port}/0")
    revocations = Revocations(Worker(app))
    with structlog.testing.capture_logs() as logs:
        revocations.start(timeout=0.5)
        wait_for(
            lambda: any(e["event"] == "revocations.watch_failed" for e in logs),
            "the watch to report its failure",
        )
        revocations.stop()
    events = [e["event"] for e in logs]
    assert "revocations.not_loaded" in events
    assert "pw-not-shown" not in str(logs)
    assert not revocations.is_revoked("anything")
    app.close()


class RacingBackend(MemoryBackend):
    """A memory backend that runs ``during_read`` once while revocations() is being read:
    the list returned is the one read before (as a notice arrives amid a real read)."""

    during_read: Callable[[], None] | None = None

    def revocations(self) -> list[Revocation]:
        found = super().revocations()
        action, self.during_read = self.during_read, None
        if action is not None:
            action()
        return found


def test_notices_that_arrive_while_the_store_is_read_are_kept(
    make_app: Callable[..., App],
) -> None:
    # Given a revoked task, and a store read during which another task is revoked
    # and the first one's revocation removed
    app = make_app("memory://", backend="memory://")
    backend = app._backend = RacingBackend()
    backend.add_revocation("removed-amid", terminate=False, ttl=60)

    def amid() -> None:
        backend.add_revocation("added-amid", terminate=False, ttl=60)
        backend.remove_revocation("removed-amid")

    backend.during_read = amid

    # When a worker's revocations start (and read the store)
    revocations = Revocations(Worker(app))
    revocations.start()
    try:
        # Then what the notices said wins over the older read
        assert revocations.is_revoked("added-amid")
        assert len(revocations) == 1
    finally:
        revocations.stop()


def test_stopped_revocations_hear_nothing_more(
    make_revocations: Callable[..., tuple[App, Revocations]],
) -> None:
    app, revocations = make_revocations()
    revocations.stop()

    app.revoke(new_id())

    assert len(revocations) == 0


# -- workers refuse revoked tasks (needs worker.revocations wired by the lead) -------------


@pytest.fixture(
    params=[
        "memory",
        pytest.param("amqp+redis", marks=pytest.mark.integration),
        pytest.param("redis+postgresql", marks=pytest.mark.integration),
    ]
)
def wapp(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Iterator[App]:
    """An app on memory (both), RabbitMQ with the Redis backend, Redis with PostgreSQL."""
    broker, _, backend = request.param.partition("+")
    url = "memory://" if broker == "memory" else require_broker(broker)
    with backend_app_options(backend or "memory") as options:
        app = make_app(url, **options)
        yield app
        app.close()


def dead_letters(app: App) -> dict[str, DeadLetter]:
    return {d.id: d for d in app.dead_letters(limit=None)}


def test_a_worker_started_after_the_revoke_dead_letters_the_task(wapp: App) -> None:
    runs: list[int] = []

    @wapp.task
    def work(n: int) -> int:
        runs.append(n)
        return n

    # Given a task revoked while it waits in its queue
    revoked, kept = work.delay(1), work.delay(2)
    wapp.revoke(revoked.id)

    # When a worker starts
    with running_worker(wapp) as worker:
        assert kept.get(timeout=20) == 2
        drain(worker)

    # Then the revoked task did not run: it is dead-lettered with reason "revoked"
    assert runs == [2]
    entry = dead_letters(wapp)[revoked.id]
    assert entry.reason == "revoked"
    assert revoked.state == REVOKED


def test_a_revocation_reaches_a_running_worker(wapp: App) -> None:
    runs: list[str] = []

    @wapp.task
    def work(tag: str) -> str:
        runs.append(tag)
        return tag

    with running_worker(wapp) as worker:
        # Given a running worker
        assert work.delay("before").get(timeout=20) == "before"

        # When a task is revoked, then sent
        task_id = new_id()
        wapp.revoke(task_id)
        revocations = worker.revocations
        assert revocations is not None, "the worker has no revocations (not wired)"
        wait_for(lambda: revocations.is_revoked(task_id), "the revocation to reach the worker")
        handle = work.apply_async(("revoked",), task_id=task_id)
        assert work.delay("after").get(timeout=20) == "after"
        drain(worker)

    # Then it is dead-lettered unrun, and reads REVOKED
    assert "revoked" not in runs
    assert dead_letters(wapp)[task_id].reason == "revoked"
    with pytest.raises(TaskFailed, match="REVOKED"):
        handle.get(timeout=5)


def test_terminate_stops_the_running_task_and_the_worker_goes_on(wapp: App) -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    @wapp.task(max_retries=0)
    def sleepy() -> None:
        started.set()
        while not release.wait(0.05):
            pass
        finished.append(True)

    @wapp.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        with running_worker(wapp, concurrency=2) as worker:
            # Given a task running
            handle = sleepy.delay()
            assert started.wait(20), "the task did not start"

            # When it is revoked with terminate
            assert wapp.revoke(handle.id, terminate=True) == REVOKED

            # Then it is stopped and dead-lettered "revoked", and the worker serves on
            wait_for(lambda: handle.id in dead_letters(wapp), "the task to be dead-lettered")
            assert dead_letters(wapp)[handle.id].reason == "revoked"
            assert add.delay(2, 3).get(timeout=20) == 5
            assert handle.state == REVOKED
            drain(worker, raise_errors=False)
    finally:
        release.set()
    assert finished == []


def test_a_replayed_revoked_task_runs(wapp: App) -> None:
    """Replaying a revoked task's dead letter clears its revocation (mqtasks.dlq)."""
    runs: list[int] = []

    @wapp.task
    def work(n: int) -> int:
        runs.append(n)
        return n

    handle = work.delay(7)
    wapp.revoke(handle.id)
    with running_worker(wapp) as worker:
        wait_for(lambda: handle.id in dead_letters(wapp), "the task to be dead-lettered")
        # The worker stores the dead letter's outcome just after publishing it, and
        # acks the message last: replayed before that, the outcome would land after
        # the replay forgot the old one, and stay (the first stored outcome wins).
        drain(worker, raise_errors=False)

        assert wapp.replay_dead_letters(ids=[handle.id]) == 1

        assert handle.get(timeout=20) == 7
        drain(worker)
    assert runs == [7]


# -- mqtasks revoke --------------------------------------------------------------------------


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    require_broker("redis")
    prefix = unique_name("cli-revoke") + ":"
    yield prefix
    delete_keys(prefix)


@pytest.mark.integration
def test_cli_revokes_each_id_and_says_so(redis_prefix: str, make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend=REDIS_URL, backend_key_prefix=redis_prefix)
    done_id = new_id()
    app.backend.store_result(done_id, b'{"state":"SUCCEEDED","value":1}', final=True, expires=60)
    env = clean_env(
        MQTASKS_BROKER_URL="memory://",
        MQTASKS_BACKEND_URL=REDIS_URL,
        MQTASKS_BACKEND_KEY_PREFIX=redis_prefix,
    )

    done = run([MQTASKS, "revoke", "-A", "tests.cli_app", "a-1", done_id, "--terminate"], env=env)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "revoked a-1 (terminate)",
        f"revoked {done_id} (terminate) (it had ended already: SUCCEEDED)",
    ]
    found = {r.task_id: r.terminate for r in app.backend.revocations()}
    assert found == {"a-1": True, done_id: True}
    assert app.handle("a-1").state == REVOKED


def test_cli_without_a_backend_is_a_usage_error() -> None:
    env = clean_env(MQTASKS_BROKER_URL="memory://")
    done = run([MQTASKS, "revoke", "-A", "tests.cli_app", "some-id"], env=env)
    assert done.returncode == 2
    assert "MQTASKS_BACKEND_URL" in done.stderr


def test_cli_refuses_a_bad_id_before_anything_is_revoked() -> None:
    env = clean_env(MQTASKS_BROKER_URL="memory://", MQTASKS_BACKEND_URL="memory://")
    done = run([MQTASKS, "revoke", "-A", "tests.cli_app", "ok", "x" * 300], env=env)
    assert done.returncode == 2
    assert "1 to 255 characters" in done.stderr
    assert "revoked" not in done.stdout


def test_cli_masks_the_password_when_the_backend_is_unreachable() -> None:
    port = free_port()
    env = clean_env(
        MQTASKS_BROKER_URL="memory://",
        MQTASKS_BACKEND_URL=f"redis://:pw-not-shown@127.0.0.1:{port}/0",
    )
    done = run([MQTASKS, "revoke", "-A", "tests.cli_app", "some-id"], env=env)
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr
    assert "pw-not-shown" not in done.stderr + done.stdout


def test_a_revoke_through_an_unreachable_backend_raises_masked(
    make_app: Callable[..., App],
) -> None:
    port = free_port()
    app = make_app("memory://", backend=f"redis://:pw-not-shown@127.0.0.1:{port}/0")
    with pytest.raises(BackendError) as raised:
        revoke(app, "some-id")
    assert "pw-not-shown" not in str(raised.value)
    app.close()
