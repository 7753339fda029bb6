"""``mqtasks result`` as a user runs it (a subprocess), on results a real worker stored
in the local Redis; and ``mqtasks worker`` refusing to start without its backend."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from mqtasks import App
from mqtasks.cli.result import RET_FAILED, RET_NOT_READY
from mqtasks.testing import running_worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.cli import MQTASKS, clean_env, json_lines, run
from tests._helpers.redis import delete_keys
from tests._helpers.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of the test's own, deleted after it."""
    require_broker("redis")
    prefix = unique_name("cli-results") + ":"
    yield prefix
    delete_keys(prefix)


def _result(prefix: str, *args: str) -> tuple[int, str, str]:
    env = clean_env(
        MQTASKS_BROKER_URL="memory://",
        MQTASKS_BACKEND_URL=REDIS_URL,
        MQTASKS_BACKEND_KEY_PREFIX=prefix,
    )
    done = run([MQTASKS, "result", "-A", "tests.cli_app", *args], env=env)
    return done.returncode, done.stdout, done.stderr


def test_result_prints_state_value_and_failure(prefix: str, make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend=REDIS_URL, backend_key_prefix=prefix)

    @app.task
    def add(x: int, y: int) -> dict[str, int]:
        return {"sum": x + y}

    @app.task(max_retries=0)
    def boom() -> None:
        raise ValueError("kaput")

    ok, bad = add.delay(2, 3), boom.delay()
    with running_worker(app):
        ok.get(timeout=20)
        bad.get(timeout=20, propagate=False)

    code, out, _ = _result(prefix, ok.id)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{ok.id}  SUCCEEDED  task={add.name}")
    assert 'value: {"sum": 5}' in out

    code, out, _ = _result(prefix, bad.id)
    assert code == RET_FAILED
    assert f"{bad.id}  DEAD_LETTERED" in out
    assert "reason: max_retries_exceeded" in out
    assert "error: ValueError: kaput" in out
    assert 'raise ValueError("kaput")' in out

    code, out, _ = _result(prefix, bad.id, "--json")
    document = json.loads(out)
    assert code == RET_FAILED
    assert document["id"] == bad.id and document["state"] == "DEAD_LETTERED"
    assert document["error"]["type"] == "ValueError"

    code, out, _ = _result(prefix, "no-such-task", "--wait", "0.2", "--json")
    assert code == RET_NOT_READY
    assert json.loads(out) == {"id": "no-such-task", "state": "PENDING"}


def test_result_without_a_backend_is_a_usage_error() -> None:
    env = clean_env(MQTASKS_BROKER_URL="memory://")
    done = run([MQTASKS, "result", "-A", "tests.cli_app", "some-id"], env=env)
    assert done.returncode == 2
    assert "MQTASKS_BACKEND_URL" in done.stderr


def test_worker_exits_at_start_when_its_backend_is_unreachable() -> None:
    port = free_port()
    env = clean_env(
        MQTASKS_BROKER_URL="memory://",
        MQTASKS_BACKEND_URL=f"redis://:pw-not-shown@127.0.0.1:{port}/0",
        MQTASKS_LOG_FORMAT="json",
    )
    done = run([MQTASKS, "worker", "-A", "tests.cli_app"], env=env)
    assert done.returncode == 1
    [event] = json_lines(done.stderr, "worker.start_failed")
    assert "cannot be reached" in event["error"] and f"127.0.0.1:{port}" in event["error"]
    assert "pw-not-shown" not in done.stderr
