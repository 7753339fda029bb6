"""The ``mqtasks`` command line, end to end: real worker subprocesses on the local brokers.

Workers run ``python -m mqtasks worker -A tests.cli_app`` (see ``tests/cli_app.py``) in a
session of their own, log JSON to a file, and record each task start and finish in another
file. The ``run_cli`` fixture kills whatever is left of them at teardown. Waits are deadline
loops on those files, never bare sleeps.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu
import pytest

from mqtasks import App, __version__
from mqtasks.transport import RedisTransport
from mqtasks.transport.base import Envelope
from mqtasks.transport.redis import encode_element
from tests import cli_app
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.cli import (
    MQTASKS,
    PYTHON,
    ROOT,
    CliWorker,
    children,
    clean_env,
    json_lines,
    proc_stat,
    run,
    session_members,
)
from tests._helpers.wait import wait_for

BROKER_KINDS = [pytest.param("amqp", id="amqp"), pytest.param("redis", id="redis")]


# -- helpers -----------------------------------------------------------------------------


@dataclass
class Record:
    """The file tasks of ``tests/cli_app.py`` append ``event tag pid time`` lines to."""

    path: Path

    def entries(self) -> list[tuple[str, str, int]]:
        if not self.path.exists():
            return []
        out = []
        text = self.path.read_text()
        # A line being appended while this reads it may be seen in part: it is read next time
        lines = text.splitlines(keepends=True)
        for line in lines if text.endswith("\n") else lines[:-1]:
            event, tag, pid, _ = line.split()
            out.append((event, tag, int(pid)))
        return out

    def count(self, event: str, tag: str | None = None) -> int:
        return sum(1 for e, t, _ in self.entries() if e == event and (tag is None or t == tag))

    def pids(self, event: str = "finish", prefix: str = "") -> set[int]:
        return {p for e, t, p in self.entries() if e == event and t.startswith(prefix)}

    def tags(self, event: str = "finish", prefix: str = "") -> set[str]:
        return {t for e, t, _ in self.entries() if e == event and t.startswith(prefix)}


@dataclass
class Scenario:
    """One test's broker, run-unique queue, record file and publishing app."""

    kind: str
    url: str
    queue: str
    record: Record
    options: dict[str, Any] = field(default_factory=dict)
    env_extra: dict[str, str] = field(default_factory=dict)
    _app: App | None = None

    @property
    def app(self) -> App:
        """The same app the worker loads (same task names and queue), to publish with."""
        if self._app is None:
            self._app = cli_app.make_app(self.url, self.queue, self.options)
        return self._app

    def env(self) -> dict[str, str]:
        return clean_env(
            MQTASKS_BROKER_URL=self.url,
            CLI_TEST_QUEUE=self.queue,
            CLI_TEST_RECORD=str(self.record.path),
            CLI_TEST_TRANSPORT_OPTIONS=json.dumps(self.options),
            **self.env_extra,
        )

    def send(self, tag: str, seconds: float = 0.0) -> None:
        self.app.tasks[cli_app.WORK].delay(tag, seconds)

    def ready(self) -> int:
        """Messages ready in the queue."""
        return self.app.transport.message_counts([self.app.queue(self.queue)])[self.queue]

    @property
    def redis(self) -> RedisTransport:
        """The ``redis://`` transport of the publishing app (Redis scenarios only)."""
        transport = self.app.transport
        assert isinstance(transport, RedisTransport), transport
        return transport

    def redis_keys(self, suffix: str = "*") -> list[bytes]:
        """This test's Redis keys (under its ``key_prefix``) matching ``suffix``."""
        pattern = self.options["key_prefix"].replace("{", "[{]").replace("}", "[}]") + suffix
        return list(self.redis.publisher().scan_iter(match=pattern, count=1000))

    def in_flight(self) -> int:
        """Messages in this test's Redis processing lists (delivered, not yet acked)."""
        client = self.redis.publisher()
        return sum(int(client.llen(key)) for key in self.redis_keys(":proc:*"))

    def consumers(self) -> set[str]:
        """Consumer ids registered in this test's Redis registry (``{prefix}:consumers``)."""
        client = self.redis.publisher()
        return {k.decode() for k in client.hkeys(self.redis.registry_key)}

    def push_raw(self, element: bytes) -> None:
        """LPUSH a list element to this test's Redis queue, bypassing mqtasks' publish."""
        self.redis.publisher().lpush(self.redis.queue_key(self.queue), element)

    def close(self) -> None:
        if self._app is None:
            return
        if self.kind == "redis":
            try:
                keys = self.redis_keys()
                if keys:
                    self.redis.publisher().delete(*keys)
            except Exception:  # best effort, like conftest.cleanup
                pass
        cleanup(self._app)


MakeScenario = Callable[..., Scenario]
RunCli = Callable[..., CliWorker]


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[MakeScenario]:
    """A factory of scenarios on a broker kind; queues (and Redis keys) deleted after."""
    made: list[Scenario] = []

    def make(kind: str, **options: Any) -> Scenario:
        url = require_broker(kind)
        queue = unique_name("cli")
        if kind == "redis":
            # Keys of our own, under one hash tag: this test's workers register, sweep
            # and restore only among themselves, and teardown deletes every key.
            options = {"key_prefix": "{" + queue + "}", **options}
        s = Scenario(kind, url, queue, Record(tmp_path / f"{queue}.record"), options)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def run_cli(tmp_path: Path, scenario: MakeScenario) -> Iterator[RunCli]:
    """Start ``python -m mqtasks worker -A tests.cli_app ...``; kill what is left at teardown.

    It depends on ``scenario`` so that workers are dead before their queues are deleted.
    """
    workers: list[CliWorker] = []

    def start(s: Scenario, *args: str, app: str = "tests.cli_app") -> CliWorker:
        n = len(workers)
        stderr, stdout = tmp_path / f"worker-{n}.err", tmp_path / f"worker-{n}.out"
        with open(stderr, "ab") as err, open(stdout, "ab") as out:
            proc = subprocess.Popen(
                [PYTHON, "-m", "mqtasks", "worker", "-A", app, "--log-format", "json", *args],
                cwd=ROOT,
                env=s.env(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = CliWorker(proc, stderr, stdout)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


# -- 1. help and version ---------------------------------------------------------------------


def test_version_and_help() -> None:
    """``mqtasks --version``, ``python -m mqtasks --help`` and ``worker --help`` work."""
    version = run([MQTASKS, "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"mqtasks, version {__version__}"

    top = run([PYTHON, "-m", "mqtasks", "--help"])
    assert top.returncode == 0, top.stderr
    assert "worker" in top.stdout

    worker = run([PYTHON, "-m", "mqtasks", "worker", "--help"])
    assert worker.returncode == 0, worker.stderr
    assert "Exit codes:" in worker.stdout
    for code in "01234":
        assert re.search(rf"^\s+{code}\s+\S", worker.stdout, re.MULTILINE), code
    for option in ("--app", "--queues", "--concurrency", "--processes", "--shutdown-timeout"):
        assert option in worker.stdout


# -- 2. startup errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param(
            "tests.no_such_module",
            "Cannot import module 'tests.no_such_module'",
            id="missing-module",
        ),
        pytest.param(
            "tests.cli_app:no_such_attr", "has no attribute 'no_such_attr'", id="missing-attribute"
        ),
        pytest.param(
            "tests.cli_app:NOT_AN_APP", "is a str, not an mqtasks App", id="str-attribute"
        ),
        pytest.param("tests.cli_app:ping", "is a Task, not an mqtasks App", id="task-attribute"),
    ],
)
def test_app_option_not_naming_an_app_exits_2(tmp_path: Path, target: str, message: str) -> None:
    """``-A`` naming no App is a usage error (exit 2), and nothing of the module runs."""
    record = tmp_path / "record"
    result = run(
        [PYTHON, "-m", "mqtasks", "worker", "-A", target],
        env=clean_env(MQTASKS_BROKER_URL="memory://", CLI_TEST_RECORD=str(record)),
    )
    # -A pointing at a task must not call it.
    assert not record.exists(), f"the task ran while loading -A {target}: {record.read_text()}"
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_broker_scheme_names_the_supported_ones() -> None:
    result = run(
        [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.cli_app", "--log-format", "json"],
        env=clean_env(MQTASKS_BROKER_URL="amqp2://guest:guest@127.0.0.1:5672//"),
    )
    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    assert "Unknown transport 'amqp2'" in output
    assert (
        "Supported URL schemes: amqp, amqps, memory, postgres, postgresql, pyamqp, redis, "
        "redis+kombu, redis+sentinel, rediss, rediss+kombu, rediss+sentinel, sqlite, sqs." in output
    )
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("amqp://guest:Zq9-LeakCheck-pw@127.0.0.1:1//", id="amqp"),
        pytest.param("redis://:Zq9-LeakCheck-pw@127.0.0.1:1/0", id="redis"),
    ],
)
def test_unreachable_broker_exits_1_without_showing_the_password(url: str) -> None:
    """Port 1 on loopback refuses connections: exit 1 quickly, password masked."""
    result = run(
        [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.cli_app", "--log-format", "json"],
        env=clean_env(
            MQTASKS_BROKER_URL=url, MQTASKS_PUBLISH_RETRIES="0", MQTASKS_CONNECT_TIMEOUT="2"
        ),
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    failures = json_lines(output, "worker.start_failed")
    assert failures, output
    assert "127.0.0.1:1" in failures[0]["error"]
    assert "Zq9-LeakCheck-pw" not in output
    assert "**" in failures[0]["broker"]


# -- 3. run and stop ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_worker_runs_published_tasks_and_stops_on_sigterm(
    kind: str, scenario: MakeScenario, run_cli: RunCli
) -> None:
    s = scenario(kind)
    worker = run_cli(s, "-c", "2", "--shutdown-timeout", "10")
    worker.wait_started()

    # When tasks are published from this process with the same app definition
    for i in range(5):
        s.send(f"t{i}")

    # Then the worker runs each of them once
    wait_for(lambda: s.record.count("finish") == 5, "5 finished tasks")
    assert sorted(t for e, t, _ in s.record.entries() if e == "finish") == [
        f"t{i}" for i in range(5)
    ]
    assert s.record.pids() == {worker.pid}

    # And SIGTERM stops it cleanly
    worker.signal(signal.SIGTERM)
    assert worker.wait(12) == 0, worker.stderr()
    stopped = worker.logs("worker.stopped")
    assert len(stopped) == 1
    assert stopped[0]["clean"] is True
    assert s.ready() == 0
    if kind == "redis":
        assert s.in_flight() == 0
        assert s.consumers() == set()


# -- 4. graceful drain --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_sigterm_lets_the_running_task_finish_and_acks_it(
    kind: str, scenario: MakeScenario, run_cli: RunCli
) -> None:
    s = scenario(kind)
    worker = run_cli(s, "-c", "1", "--shutdown-timeout", "15")
    worker.wait_started()

    # Given a 2 s task running
    s.send("slow", 2.0)
    wait_for(lambda: s.record.count("start", "slow") == 1, "the slow task to start")

    # When SIGTERM arrives
    worker.signal(signal.SIGTERM)

    # Then the worker waits for it, exits 0, and the message is acked
    assert worker.wait(15) == 0, worker.stderr()
    assert s.record.count("finish", "slow") == 1
    assert worker.logs("worker.stopping")
    assert worker.logs("worker.stopped")[0]["clean"] is True
    assert s.ready() == 0
    if kind == "redis":
        assert s.in_flight() == 0
        assert s.consumers() == set()  # deregistered at close

    # And a new worker does not get it again: it runs only the task sent after it
    second = run_cli(s, "-c", "1", "--shutdown-timeout", "5")
    second.wait_started()
    s.send("after")
    wait_for(lambda: s.record.count("finish", "after") == 1, "the task sent afterwards")
    assert s.record.count("start", "slow") == 1
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0, second.stderr()


# -- 5. shutdown timeout ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_shutdown_timeout_exits_3_and_the_task_is_not_lost(
    kind: str, scenario: MakeScenario, run_cli: RunCli
) -> None:
    s = scenario(kind)
    worker = run_cli(s, "-c", "1", "--shutdown-timeout", "1")
    worker.wait_started()

    # Given a 30 s task running
    s.send("long", 30.0)
    wait_for(lambda: s.record.count("start", "long") == 1, "the long task to start")

    # When SIGTERM arrives, the 1 s grace period runs out: exit code 3
    worker.signal(signal.SIGTERM)
    assert worker.wait(8) == 3, worker.stderr()
    assert worker.logs("worker.shutdown_timeout")
    assert s.record.count("finish", "long") == 0
    if kind == "redis":
        # handed back at close: ready again at once, no longer in flight
        assert (s.ready(), s.in_flight()) == (1, 0)

    # Then the message went back to the broker: a new worker starts it again
    run_cli(s, "-c", "1").wait_started()
    wait_for(lambda: s.record.count("start", "long") == 2, "the long task to start again")


# -- 6. SIGKILL mid-task ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_task_of_a_killed_worker_runs_on_the_next_one(
    kind: str, scenario: MakeScenario, run_cli: RunCli
) -> None:
    s = scenario(kind)
    if kind == "redis":
        # A dead consumer's in-flight messages go back to the queue once its liveness
        # key expired, on the next sweep of a live consumer: keep both short.
        s.env_extra["CLI_TEST_LIVENESS_TTL"] = "2"
    worker = run_cli(s, "-c", "1", "--shutdown-timeout", "5")
    worker.wait_started()

    # Given a task running
    s.send("doomed", 1.5)
    wait_for(lambda: s.record.count("start", "doomed") == 1, "the task to start")

    # When the worker is killed with SIGKILL
    worker.signal(signal.SIGKILL)
    assert worker.wait(5) == -signal.SIGKILL
    if kind == "redis":
        # the message stays recorded in flight for the dead consumer, not lost
        assert (s.ready(), s.in_flight()) == (0, 1)
        # (its control agent is a consumer of the same process, of its own queue)
        assert {c.split(":")[1] for c in s.consumers()} == {str(worker.pid)}

    # Then another worker runs the task to completion
    second = run_cli(s, "-c", "1", "--shutdown-timeout", "5")
    second.wait_started()
    wait_for(lambda: s.record.count("finish", "doomed") >= 1, "the task to finish", timeout=25)
    assert s.record.count("start", "doomed") == 2
    assert s.record.count("finish", "doomed") == 1
    assert s.record.pids("finish") == {second.pid}
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0, second.stderr()
    assert s.ready() == 0
    if kind == "redis":
        assert second.logs("redis.consumers_restored")
        assert s.in_flight() == 0
        assert s.consumers() == set()  # the dead one swept, the second deregistered


# -- 7. --processes ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_processes_2_runs_two_children_and_replaces_a_dead_one(
    scenario: MakeScenario, run_cli: RunCli
) -> None:
    s = scenario("amqp")
    parent = run_cli(s, "--processes", "2", "-c", "1", "--shutdown-timeout", "10")
    parent.wait_started(2)
    children = {e["pid"] for e in parent.logs("supervisor.child_started")}
    assert len(children) == 2
    for pid in children:
        assert (proc_stat(pid) or (0,))[0] == parent.pid

    # Two processes share the work
    for i in range(40):
        s.send(f"a{i}", 0.05)
    wait_for(lambda: len(s.record.tags(prefix="a")) == 40, "40 finished tasks")
    assert s.record.pids(prefix="a") == children

    # When one child is killed, the supervisor starts another in its slot
    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    died = parent.wait_log("supervisor.child_died")
    assert died[0]["pid"] == victim
    started = parent.wait_log("supervisor.child_started", 3)
    replacement = started[-1]["pid"]
    assert replacement not in children
    parent.wait_started(3)

    # Then the new child does work too
    for i in range(40):
        s.send(f"b{i}", 0.05)
    # (a task whose ack the killed child had not sent yet may run again: at-least-once)
    wait_for(lambda: len(s.record.tags(prefix="b")) == 40, "40 more finished tasks")
    assert replacement in s.record.pids(prefix="b")

    # And SIGTERM to the parent stops everything, leaving no process behind
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()
    assert len(parent.logs("worker.stopped")) == 2
    assert session_members(parent.pid) == []
    assert s.ready() == 0


@pytest.mark.integration
def test_ctrl_c_stops_a_multi_process_worker_gracefully(
    scenario: MakeScenario, run_cli: RunCli
) -> None:
    """Ctrl-C sends SIGINT to the whole process group: children must still drain, not force-exit."""
    s = scenario("amqp")
    parent = run_cli(s, "--processes", "2", "-c", "1", "--shutdown-timeout", "10")
    parent.wait_started(2)
    s.send("slow", 1.5)
    wait_for(lambda: s.record.count("start", "slow") == 1, "the slow task to start")

    # When the terminal's process group gets SIGINT (what Ctrl-C does)
    os.killpg(parent.pid, signal.SIGINT)

    # Then the running task finishes and every process exits cleanly
    assert parent.wait(15) == 0, parent.stderr()
    assert not parent.logs("worker.forced_exit")
    assert s.record.count("finish", "slow") == 1
    assert session_members(parent.pid) == []


# -- 8. bad input -------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates ``path``: proof that a worker unpickled a message body."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.integration
@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_bad_messages_are_rejected_and_the_worker_keeps_running(
    kind: str, scenario: MakeScenario, run_cli: RunCli, tmp_path: Path
) -> None:
    s = scenario(kind)
    worker = run_cli(s, "-c", "1", "--shutdown-timeout", "5")
    worker.wait_started()
    marker = tmp_path / "unpickled"

    # Given three messages written bypassing mqtasks: with plain kombu to RabbitMQ, as
    # list elements of the transport's own format straight into the Redis list
    bad = {
        "decode_error": (b'{"args": [1,', "application/json", "utf-8", cli_app.WORK),
        "content_type": (
            pickle.dumps(_Trap(str(marker))),
            "application/x-python-serialize",
            "binary",
            cli_app.WORK,
        ),
        "unknown_task": (b'{"args": ["x"], "kwargs": {}}', "application/json", "utf-8", "cli.nope"),
    }
    expected: dict[str | None, str] = {f"bad-{r}": r for r in bad}
    if kind == "redis":
        for reason, (body, content_type, encoding, task) in bad.items():
            s.push_raw(
                encode_element(
                    Envelope(
                        body=body,
                        message_id=f"bad-{reason}",
                        headers={"mqtasks-task": task, "mqtasks-protocol": 1},
                        content_type=content_type,
                        content_encoding=encoding,
                    )
                )
            )
        # and a fourth that is no element of that format at all (no id to report)
        s.push_raw(b"not an mqtasks element")
        expected[None] = "decode_error"
    else:
        with kombu.Connection(s.url, connect_timeout=5) as conn:
            producer = conn.Producer()
            for reason, (body, content_type, encoding, task) in bad.items():
                producer.publish(
                    body,
                    exchange="",
                    routing_key=s.queue,
                    content_type=content_type,
                    content_encoding=encoding,
                    headers={"mqtasks-task": task, "mqtasks-protocol": 1},
                    message_id=f"bad-{reason}",
                    delivery_mode=2,
                    retry=True,
                )
    # And a good one after them
    s.send("good")

    # Then each bad one is rejected with its reason, and the good one still runs
    wait_for(lambda: s.record.count("finish", "good") == 1, "the good task")
    rejected = {e["task_id"]: e for e in worker.wait_log("message.rejected", len(expected))}
    assert {k: v["reason"] for k, v in rejected.items()} == expected
    assert rejected["bad-unknown_task"]["task_name"] == "cli.nope"
    assert "application/x-python-serialize" in rejected["bad-content_type"]["detail"]
    assert not marker.exists(), "the worker unpickled a message body"
    assert worker.proc.poll() is None
    assert s.ready() == 0
    if kind == "redis":
        wait_for(lambda: s.in_flight() == 0, "the rejections to be settled")

    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0, worker.stderr()
    assert not marker.exists()
    if kind == "redis":
        assert s.in_flight() == 0


def test_a_child_stopped_before_it_could_handle_sigterm_is_a_clean_stop() -> None:
    """A child spawned just before the SIGTERM dies of it unhandled; it held no messages."""
    code = (
        "import sys; from mqtasks.process import Supervisor; "
        "sys.exit(Supervisor([sys.executable, '-c', 'import time; time.sleep(30)'], 2).run())"
    )
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=clean_env())
    # The children sleep with SIGTERM's default action: it kills them
    wait_for(lambda: len(children(proc.pid)) == 2, "the supervisor's two children")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


_LARGE_BUFFERS = """
import sys
from mqtasks import process
if sys.argv[1] == "fixed":
    process.return_large_buffers_to_the_os()
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
base = rss_mib()
keep = []
for _ in range(3):
    body = bytes(20 * 1024 * 1024)  # a large message
    keep.append(bytes(100))  # something small allocated while it is held
    del body
print(rss_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_worker_gives_the_memory_of_large_messages_back() -> None:
    """The worker fixes glibc's mmap threshold: freed large buffers leave the process."""

    def grown(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run(
            [sys.executable, "-c", _LARGE_BUFFERS, mode],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=60,
        )
        return int(out.stdout.strip())

    assert grown("stock") >= 15  # glibc's sliding threshold keeps a 20 MiB buffer's pages
    assert grown("fixed") <= 5


def test_sigterm_while_the_app_is_still_importing_is_a_clean_stop(tmp_path: Path) -> None:
    """A worker told to stop before it ever connected exits 0 (not killed by the signal)."""
    # Given an app module that takes seconds to import, and says when it has begun
    marker = tmp_path / "importing"
    (tmp_path / "slow_app.py").write_text(
        "import pathlib, sys, time\n"
        "from mqtasks import App\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(3)\n"
        "app = App('slow', broker='memory://')\n"
    )
    env = clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.Popen(
        [PYTHON, "-m", "mqtasks", "worker", "-A", "slow_app", "--log-format", "json"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(marker.exists, "the app's import to begin")
        # When SIGTERM arrives in the middle of that import
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then the worker stops cleanly, without starting
    assert proc.returncode == 0, err.decode(errors="replace")
    events = [e["event"] for e in json_lines(err.decode(errors="replace"))]
    assert "worker.stopping" in events and "worker.stopped" in events
    assert "worker.started" not in events
