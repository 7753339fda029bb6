"""A worker SIGKILLed in the middle of a chord: the callback still runs exactly once.

Workers are subprocesses (``mqtasks worker -A tests.canvas_crash_app``) on
RabbitMQ or Redis, with the Redis result backend; the tasks count their runs
with ``INCR`` on keys of the test's own.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mqtasks import App
from mqtasks.canvas import chord
from tests import canvas_crash_app
from tests._helpers.brokers import REDIS_URL, cleanup, require_broker, unique_name
from tests._helpers.cli import PYTHON, ROOT, CliWorker, clean_env
from tests._helpers.redis import delete_keys
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.slow

#: Members of the chord.
SIZE = 20


class ChordCrash:
    """A queue, key prefix and publishing app for chord worker subprocesses."""

    def __init__(self, kind: str, kill: str, tmp_path: Path) -> None:
        self.url = require_broker(kind)
        require_broker("redis")
        self.kind, self.kill, self.tmp_path = kind, kill, tmp_path
        self.queue = unique_name("chord-crash")
        self.prefix = "{" + self.queue + "}"
        self.options: dict[str, Any] = {}
        if kind == "redis":
            # Keys of our own; a killed worker's messages come back within about 1.5 s.
            self.options = {"key_prefix": self.prefix, "liveness_ttl": 1.0, "sweep_interval": 0.25}
        self.backend_prefix = self.prefix + ":backend:"
        self.counters = self.prefix + ":runs"
        self.app = canvas_crash_app.make_app(
            self.url,
            self.queue,
            self.options,
            backend=REDIS_URL,
            backend_key_prefix=self.backend_prefix,
        )
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.workers: list[CliWorker] = []

    def start(self, concurrency: int = 2) -> CliWorker:
        n = len(self.workers)
        stderr, stdout = self.tmp_path / f"worker-{n}.err", self.tmp_path / f"worker-{n}.out"
        env = clean_env(
            MQTASKS_BROKER_URL=self.url,
            MQTASKS_BACKEND_URL=REDIS_URL,
            MQTASKS_BACKEND_KEY_PREFIX=self.backend_prefix,
            CANVAS_TEST_QUEUE=self.queue,
            CANVAS_TEST_KEY=self.counters,
            CANVAS_TEST_KILL=self.kill,
            CANVAS_TEST_TRANSPORT_OPTIONS=json.dumps(self.options),
        )
        command = [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.canvas_crash_app"]
        with open(stderr, "ab") as err, open(stdout, "ab") as out:
            proc = subprocess.Popen(
                [*command, "--log-format", "json", "--concurrency", str(concurrency)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.workers.append(CliWorker(proc, stderr, stdout))
        return self.workers[-1]

    def count(self, name: str) -> int:
        value = self.redis.get(f"{self.counters}:{name}")
        return int(value or 0)

    def idle(self) -> bool:
        """Whether the queue holds nothing ready or delayed."""
        specs = [self.app.queue(self.queue)]
        transport = self.app.transport
        ready = sum(transport.message_counts(specs).values())
        return ready + sum(transport.delayed_counts(specs).values()) == 0

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        delete_keys(self.prefix)
        self.redis.close()
        cleanup(self.app)


@pytest.fixture
def chord_crash(tmp_path: Path) -> Iterator[Any]:
    made: list[ChordCrash] = []

    def make(kind: str, kill: str) -> ChordCrash:
        made.append(ChordCrash(kind, kill, tmp_path))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _send(app: App) -> Any:
    member = app.tasks[canvas_crash_app.MEMBER]
    callback = app.tasks[canvas_crash_app.CALLBACK]
    return chord([member.s(i) for i in range(SIZE)], callback.s()).delay()


@pytest.mark.parametrize("kind", ["amqp", "redis"])
@pytest.mark.parametrize("kill", ["member", "publish"])
def test_worker_killed_mid_chord_runs_the_callback_exactly_once(
    chord_crash: Any, kind: str, kill: str
) -> None:
    # Given a chord of 20 members, and a worker that dies once: in a member's
    # body ("member"), or once the callback is published but before the member
    # that published it is acknowledged ("publish")
    c: ChordCrash = chord_crash(kind, kill)
    handle = _send(c.app)
    # One thread in the worker that dies: with two, its other thread may
    # already run the callback it has just published when the kill comes,
    # and a callback killed mid-run runs again (as any task would), which
    # is not what this test is about.
    first = c.start(concurrency=1)
    # When it is SIGKILLed, and another worker takes over
    assert first.wait(60) == -9, first.stderr()[-4000:]
    second = c.start()
    # Then the chord completes with every member's value
    assert handle.get(timeout=60) == sum(range(SIZE))
    wait_for(c.idle, "the queue to empty (copies handled)", timeout=30)
    second.wait_log("workflow.chord_completed")
    # And the callback ran exactly once, each member at least once
    assert c.count("callback") == 1
    assert all(c.count(f"member:{i}") >= 1 for i in range(SIZE))
    if kill == "member":
        assert c.count("member:0") == 2
    else:
        # The member that published the callback ran again and published it
        # again, with the same id: that copy was not run.
        assert second.logs("workflow.step_done_before")
        second.wait_log("workflow.duplicate_skipped")
        assert c.count("callback") == 1
    assert second.proc.poll() is None, second.stderr()[-4000:]
