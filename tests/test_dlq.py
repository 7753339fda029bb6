"""Dead-letter tooling: list, replay and purge (Python API and ``mqtasks dlq``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from mqtasks import App
from mqtasks.cli import cli
from mqtasks.deadletter import HEADER_DEATH_REASON
from mqtasks.dlq import (
    DeadLetter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    replay_envelope,
)
from mqtasks.message import HEADER_ATTEMPT, HEADER_FIRST_FAILED_AT
from mqtasks.testing import drain, running_worker
from mqtasks.transport.base import dead_letter_spec
from tests import dlq_app
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.wait import wait_for

APP_PATH = "tests.dlq_app:create()"


@pytest.fixture
def make_dlq_app() -> Iterator[Callable[[str], App]]:
    """A factory of ``tests/dlq_app.py`` apps on a run-unique queue; queues deleted at teardown."""
    apps: list[App] = []
    dlq_app.FIXED["flaky"] = False
    dlq_app.RAN.clear()

    def make(url: str) -> App:
        app = dlq_app.create(url, unique_name("dlq"))
        apps.append(app)
        return app

    yield make
    for app in apps:
        if not app.settings.broker_url.startswith("memory"):
            spec = app.queue(app.settings.default_queue)
            try:
                app.transport.delete([spec, dead_letter_spec(spec)])
            except Exception:  # best effort
                pass
        cleanup(app)
    dlq_app.FIXED["flaky"] = False
    dlq_app.RAN.clear()


@pytest.fixture(params=["memory", "amqp", "redis"])
def dlq_url(request: pytest.FixtureRequest) -> str:
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    return require_broker(request.param)


@pytest.fixture(params=["amqp", "redis"])
def cli_url(request: pytest.FixtureRequest) -> str:
    request.applymarker(pytest.mark.integration)
    return require_broker(request.param)


def flaky_queue(app: App) -> str:
    return app.tasks[dlq_app.FLAKY].queue


def wait_for_dead_letters(app: App, n: int, timeout: float = 20.0) -> list[DeadLetter]:
    def entries() -> list[DeadLetter]:
        return list_dead_letters(app, flaky_queue(app))

    wait_for(lambda: len(entries()) >= n, lambda: f"{n} dead letters, {len(entries())}", timeout)
    return entries()


def dead_letter(app: App, *ns: int) -> list[str]:
    """Run the (broken) task with each of ``ns`` until all are dead letters; return their ids."""
    task = app.tasks[dlq_app.FLAKY]
    ids = [task.delay(n).id for n in ns]
    with running_worker(app, concurrency=1) as worker:
        wait_for_dead_letters(app, len(ns))
        drain(worker, timeout=20, raise_errors=False)
    return ids


def test_replay_envelope_resets_the_attempt_and_drops_the_death_headers() -> None:
    entry = DeadLetter.from_entry(
        body=b"{}",
        message_id="m-1",
        headers={
            "mqtasks-task": "t",
            HEADER_ATTEMPT: 4,
            HEADER_FIRST_FAILED_AT: 1.0,
            HEADER_DEATH_REASON: "max_retries_exceeded",
            "mqtasks-death-failed-at": 1_700_000_000.5,
            "x-death": [{"reason": "expired"}],
            "x-first-death-reason": "expired",
            "x-delivery-count": 3,
            "custom": "kept",
        },
        queue="q",
        content_type="application/json",
        content_encoding="utf-8",
    )
    assert entry.attempts == 4 and entry.reason == "max_retries_exceeded"
    assert entry.failed_at == datetime.fromtimestamp(1_700_000_000.5, tz=timezone.utc)
    envelope = replay_envelope(entry)
    assert dict(envelope.headers) == {"mqtasks-task": "t", HEADER_ATTEMPT: 1, "custom": "kept"}
    assert (envelope.body, envelope.message_id) == (b"{}", "m-1")


def test_broker_dead_letters_take_their_reason_from_x_death() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5)
    entry = DeadLetter.from_entry(
        body=b"",
        message_id=None,
        headers={"x-first-death-reason": "expired", "x-death": [{"time": when}]},
        queue="q",
    )
    assert entry.reason == "expired"
    assert entry.failed_at == when.replace(tzinfo=timezone.utc)
    assert json.dumps(entry.to_dict())  # broker headers become JSON-able


def test_list_replay_purge(dlq_url: str, make_dlq_app: Callable[[str], App]) -> None:
    app = make_dlq_app(dlq_url)
    queue = flaky_queue(app)
    first, second = dead_letter(app, 1, 2)

    entries = list_dead_letters(app, queue)
    assert sorted(e.id for e in entries) == sorted([first, second])
    entry = next(e for e in entries if e.id == first)
    assert entry.task == dlq_app.FLAKY
    assert entry.reason in ("max_retries_exceeded", "not_retryable")
    assert entry.exception == "RuntimeError: flaky 1 is broken"
    assert entry.traceback is not None and "raise RuntimeError" in entry.traceback
    assert entry.attempts == 1
    assert entry.failed_at is not None and entry.failed_at.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - entry.failed_at).total_seconds()) < 120
    assert entry.queue == queue
    # Listing is not destructive.
    assert sorted(e.id for e in list_dead_letters(app, queue)) == sorted([first, second])
    assert len(list_dead_letters(app, queue, limit=1)) == 1

    # Fix the task, replay one entry by id: only it comes back, and it runs.
    dlq_app.FIXED["flaky"] = True
    assert replay_dead_letters(app, queue, ids=[first]) == 1
    assert [e.id for e in list_dead_letters(app, queue)] == [second]
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20)
    assert dlq_app.RAN == [1]
    assert [e.id for e in list_dead_letters(app, queue)] == [second]

    # A filter that matches nothing leaves everything in place.
    assert replay_dead_letters(app, queue, task="no.such.task") == 0
    assert [e.id for e in list_dead_letters(app, queue)] == [second]

    # Purge empties the dead-letter queue.
    dlq_app.FIXED["flaky"] = False
    dead_letter(app, 3)
    assert len(list_dead_letters(app, queue)) == 2
    assert purge_dead_letters(app, queue) == 2
    assert list_dead_letters(app, queue) == []
    assert dlq_app.RAN == [1]


def test_replay_limit_and_task_filter(dlq_url: str, make_dlq_app: Callable[[str], App]) -> None:
    app = make_dlq_app(dlq_url)
    queue = flaky_queue(app)
    dead_letter(app, 1, 2, 3)
    dlq_app.FIXED["flaky"] = True
    # The same operations as App methods.
    assert len(app.dead_letters(queue)) == 3
    assert app.replay_dead_letters(queue, task=dlq_app.FLAKY, limit=2) == 2
    assert len(app.dead_letters(queue)) == 1
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20)
    assert len(dlq_app.RAN) == 2
    assert app.purge_dead_letters(queue) == 1
    assert app.dead_letters(queue) == []


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_ls_show_replay_purge(
    cli_url: str, make_dlq_app: Callable[[str], App], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_dlq_app(cli_url)
    queue = flaky_queue(app)
    monkeypatch.setenv("MQTASKS_BROKER_URL", cli_url)
    monkeypatch.setenv("DLQ_TEST_QUEUE", queue)
    ids = dead_letter(app, *range(7))
    outputs: list[str] = []

    code, out = invoke("dlq", "ls", "-A", APP_PATH)
    outputs.append(out)
    assert code == 0, out
    assert out.splitlines()[0].split()[:4] == ["ID", "TASK", "REASON", "ATTEMPTS"]
    assert all(i in out for i in ids) and dlq_app.FLAKY in out

    code, out = invoke("dlq", "ls", "-A", APP_PATH, queue, "--limit", "2", "--json")
    outputs.append(out)
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and {r["task"] for r in rows} == {dlq_app.FLAKY}

    code, out = invoke("dlq", "show", "-A", APP_PATH, ids[0], "--queue", queue)
    outputs.append(out)
    assert code == 0, out
    assert "RuntimeError: flaky 0 is broken" in out and "Traceback" in out

    code, out = invoke("dlq", "show", "-A", APP_PATH, "no-such-id")
    assert code == 1 and "No dead letter 'no-such-id'" in out

    code, out = invoke("dlq", "replay", "-A", APP_PATH, "--id", ids[0])
    outputs.append(out)
    assert code == 0, out
    assert "Replayed 1 dead letter." in out
    assert len(list_dead_letters(app, queue)) == 6

    code, out = invoke("dlq", "replay", "-A", APP_PATH, queue, "--task", dlq_app.FLAKY)
    outputs.append(out)
    assert code == 0, out
    assert "Replayed 6 dead letters." in out  # with a progress bar (on stderr)
    assert list_dead_letters(app, queue) == []
    dlq_app.FIXED["flaky"] = True
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20)
    assert sorted(dlq_app.RAN) == list(range(7))

    dlq_app.FIXED["flaky"] = False
    dead_letter(app, 7)
    code, out = invoke("dlq", "purge", "-A", APP_PATH, queue)
    assert code == 2 and "--yes" in out
    assert len(list_dead_letters(app, queue)) == 1
    code, out = invoke("dlq", "purge", "-A", APP_PATH, queue, "--yes")
    outputs.append(out)
    assert code == 0, out
    assert "Purged 1 dead letter" in out
    assert list_dead_letters(app, queue) == []
    assert not any("guest:guest" in o for o in outputs)
