"""Broker passwords never leave the process: not in logs, errors, CLI output,
reprs or dead-letter headers.

Each test uses a distinctive password and counts its occurrences in everything
a user could see. RabbitMQ gets a user of its own for the run (removed
afterwards); Redis is a redis-server of the module's own with ``requirepass``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from mqtasks import App, PublishError, Settings
from mqtasks.dlq import DeadLetter
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.cli import ROOT
from tests._helpers.servers import free_port, start_redis, stop
from tests._helpers.wait import wait_for

#: The password the tests look for; long enough to be masked even outside URLs.
SECRET = f"Pw-{uuid.uuid4().hex[:16]}"
#: A wrong password that contains SECRET, so one search finds either.
WRONG = f"{SECRET}-wrong"


@pytest.fixture(scope="module")
def redis_secret_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own that requires SECRET."""
    proc, port = start_redis(tmp_path_factory.mktemp("redis"), "--requirepass", SECRET)
    try:
        yield f"redis://:{SECRET}@127.0.0.1:{port}/0"
    finally:
        stop(proc)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60, check=True)


@pytest.fixture(scope="module")
def amqp_secret_url() -> Iterator[str]:
    """A RabbitMQ user of this run whose password is SECRET, on the local broker."""
    require_broker("amqp")
    user = f"mqt-redaction-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_user", user, SECRET)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield f"amqp://{user}:{SECRET}@127.0.0.1:5672//"
    finally:
        _rabbitmqctl("delete_user", user)


@pytest.fixture(params=["amqp", "redis"])
def secret_url(request: pytest.FixtureRequest) -> str:
    fixture = "amqp_secret_url" if request.param == "amqp" else "redis_secret_url"
    return str(request.getfixturevalue(fixture))


def _with_password(url: str, password: str) -> str:
    return url.replace(f":{SECRET}@", f":{password}@", 1)


def _with_port(url: str, port: int) -> str:
    head, _, rest = url.partition("@127.0.0.1:")
    return f"{head}@127.0.0.1:{port}{rest[rest.index('/') :]}"


def _env(url: str, queue: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MQTASKS_BROKER_URL": url,
        "MQTASKS_DEFAULT_QUEUE": queue,
        "MQTASKS_PUBLISH_RETRIES": "0",
        "MQTASKS_CONNECT_TIMEOUT": "3",
    }


def _cli(url: str, queue: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqtasks", *args],
        env=_env(url, queue),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _leaks(*texts: Any) -> int:
    return sum(str(text).count(SECRET) for text in texts)


@pytest.mark.parametrize("fault", ["wrong_password", "unreachable"])
def test_a_worker_that_cannot_connect_never_prints_the_password(
    secret_url: str, fault: str
) -> None:
    url = _with_password(secret_url, WRONG)
    if fault == "unreachable":
        url = _with_port(url, free_port())
    # When the worker cannot log in, or finds nobody listening
    run = _cli(
        url, unique_name("redact"), "worker", "-A", "tests.redaction_app", "--log-level", "debug"
    )
    # Then it exits 1, naming the broker with the password masked, and nowhere in full
    assert run.returncode == 1, run.stderr[-2000:]
    assert "worker.start_failed" in run.stderr
    assert ":**@127.0.0.1" in run.stderr
    assert _leaks(run.stdout, run.stderr) == 0


def test_delay_errors_and_reprs_never_show_the_password(secret_url: str) -> None:
    app = App("t", broker=_with_password(secret_url, WRONG), publish_retries=0, connect_timeout=3)
    task = app.task(name="redaction.noop", max_retries=0)(lambda: None)
    with pytest.raises(PublishError) as info:
        task.delay()
    shown = "".join(traceback.format_exception(info.value))  # chained causes included
    assert "**" in str(info.value)
    assert _leaks(shown, repr(info.value), repr(app), repr(app.settings), repr(app.transport)) == 0
    assert _leaks(repr(Settings(broker_url=secret_url)), str(Settings(broker_url=secret_url))) == 0
    app.close()


def test_a_task_error_quoting_the_broker_url_is_masked_everywhere(
    secret_url: str, make_app: Callable[..., App]
) -> None:
    queue = unique_name("redact")
    app = make_app(secret_url, default_queue=queue)
    app.task(name="redaction.leak", max_retries=0)(lambda: None)  # the worker's task, by name
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mqtasks",
            "worker",
            "-A",
            "tests.redaction_app",
            "--log-level",
            "debug",
        ],
        env=_env(secret_url, queue),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Given a task that fails quoting the broker URL and password
        app.get_task("redaction.leak").delay()

        def dead_lettered() -> list[DeadLetter]:
            assert worker.poll() is None, worker.communicate()[1][-2000:]
            return app.dead_letters(queue)

        entries = wait_for(dead_lettered, "the failed task to reach the DLQ", timeout=60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
    # Then the dead letter says what happened, with the password masked
    entry = entries[0]
    assert entry.reason == "max_retries_exceeded"
    assert entry.exception is not None and ":**@127.0.0.1" in entry.exception
    assert "password **" in entry.exception
    stored = json.dumps(entry.to_dict(), default=str)
    # and neither the dead letter, the worker's output nor the dlq commands show it
    shown = [
        _cli(secret_url, queue, "dlq", "ls", "-A", "tests.redaction_app"),
        _cli(secret_url, queue, "dlq", "show", "-A", "tests.redaction_app", entry.id),
        _cli(secret_url, queue, "dlq", "show", "-A", "tests.redaction_app", "--json", entry.id),
    ]
    assert all(run.returncode == 0 for run in shown), [run.stderr for run in shown]
    assert "task.failed" in err
    assert _leaks(out, err, stored, *[run.stdout + run.stderr for run in shown]) == 0


def test_memory_worker_masks_urls_in_task_errors(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")
    other = f"Other-{uuid.uuid4().hex}"  # a password of some other service, never a broker's

    @app.task(max_retries=0)
    def fetch() -> None:
        raise ConnectionError(f"cannot reach postgres://app:{other}@db.internal/orders")

    fetch.delay()
    with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
        drain(worker, raise_errors=False)
    entries = app.dead_letters()
    assert len(entries) == 1 and entries[0].exception is not None
    assert "postgres://app:**@db.internal/orders" in entries[0].exception
    seen = json.dumps(logs, default=str) + json.dumps(entries[0].to_dict(), default=str)
    assert other not in seen


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("amqp://bob:hunter2@rabbit:5672/vh", "amqp://bob:**@rabbit:5672/vh"),
        ("redis://:p%40ss@127.0.0.1:6379/0", "redis://:**@127.0.0.1:6379/0"),
        ("amqp://a:one@h1;amqp://b:two@h2//", "amqp://a:**@h1;amqp://b:**@h2//"),
        (
            "failed: rediss://u:x@y@cache:6380/0 (timeout)",
            "failed: rediss://u:**@cache:6380/0 (timeout)",
        ),
        (
            "no credentials in memory:// or amqp://host//",
            "no credentials in memory:// or amqp://host//",
        ),
    ],
)
def test_mask_url_masks_every_password_in_urls_and_texts(text: str, shown: str) -> None:
    from mqtasks.config import mask_url

    assert mask_url(text) == shown


def test_every_password_of_a_failover_list_is_masked_outside_urls() -> None:
    from mqtasks._url import redact, remember_secret

    # Given a failover list of two brokers, each with its own password
    first, second = f"One-{uuid.uuid4().hex[:12]}", f"Two-{uuid.uuid4().hex[:12]}"
    remember_secret(f"amqp://a:{first}@h1:5672//;amqp://b:{second}@h2:5672//")
    # Then both are masked where a text quotes them bare (an error, a traceback)
    assert redact(f"passwords {first} {second}") == "passwords ** **"
    # and a password holding ';' (allowed in a URL's user info) is masked whole
    odd = f"Semi;{uuid.uuid4().hex[:12]}"
    remember_secret(f"redis://:{odd}@cache:6379/0")
    assert redact(f"password {odd}") == "password **"
