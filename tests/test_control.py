"""Heartbeats, inspect and control: in-process workers on every transport, and
``mqtasks worker`` processes on RabbitMQ and Redis (killed, shut down, inspected
from the command line)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mqtasks import App
from mqtasks.control import (
    ControlAgent,
    HeartbeatMonitor,
    Inspector,
    WorkerView,
)
from mqtasks.control_protocol import CONTROL_EXCHANGE, MAX_BODY, app_word, encode, new_id, scope
from mqtasks.exceptions import ConfigurationError
from mqtasks.transport.envelope import Envelope
from mqtasks.worker import Worker
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.cli import PYTHON, ROOT, CliWorker, clean_env, run
from tests._helpers.wait import wait_for

TIMEOUT = 1.0


class Setup:
    """An app with two queues, a started worker and its control agent."""

    def __init__(self, url: str) -> None:
        self.app = App(unique_name("ctl"), broker=url, default_queue=unique_name("a"))
        self.other = unique_name("b")
        self.release = threading.Event()
        self.shutdowns = threading.Event()
        release = self.release

        @self.app.task(name="ctl.add")
        def add(a: int, b: int) -> int:
            return a + b

        @self.app.task(name="ctl.hold", queue=self.other)
        def hold() -> None:
            release.wait(30)

        self.add, self.hold = add, hold
        self.worker = Worker(self.app, concurrency=2)
        self.worker.start()
        self.agent = ControlAgent(self.worker, shutdown=self.shutdowns.set)
        self.agent.start()
        self.inspector = Inspector(self.app, TIMEOUT, destination=self.agent.worker_id)

    def close(self) -> None:
        self.release.set()
        self.agent.stop()
        self.worker.stop(timeout=5)
        cleanup(self.app)


@pytest.fixture
def setup(broker_url: str) -> Iterator[Setup]:
    s = Setup(broker_url)
    yield s
    s.close()


def _view(monitor: HeartbeatMonitor, worker_id: str) -> WorkerView | None:
    return next((v for v in monitor.workers() if v.heartbeat.worker_id == worker_id), None)


def test_heartbeats_describe_the_worker(setup: Setup) -> None:
    """A monitor sees the worker's host, pid, queues, threads and counts; a clean stop leaves."""
    with HeartbeatMonitor(setup.app) as monitor:
        me = setup.agent.worker_id
        view = wait_for(lambda: _view(monitor, me), "a heartbeat")
        beat = view.heartbeat
        assert not view.lost
        assert beat.pid > 0 and beat.host and beat.version and beat.rss > 0
        assert sorted(beat.queues) == sorted(setup.worker.queues)
        assert (beat.concurrency, beat.busy, beat.done, beat.failed) == (2, 0, 0, 0)

        setup.add.delay(1, 2)

        def seen(check: Callable[[WorkerView], bool]) -> Callable[[], WorkerView | None]:
            return lambda: v if (v := _view(monitor, me)) is not None and check(v) else None

        wait_for(seen(lambda v: v.heartbeat.done == 1), "done=1 in a heartbeat")
        setup.hold.delay()
        running = wait_for(seen(lambda v: bool(v.heartbeat.active)), "the running task")
        assert running.heartbeat.active[0]["task"] == "ctl.hold"
        assert running.heartbeat.busy == 1

        setup.release.set()
        setup.agent.stop()  # says goodbye
        wait_for(lambda: _view(monitor, me) is None, "the worker leaving the list")


def test_inspect_answers(setup: Setup) -> None:
    """ping, registered, stats and active answer from the worker."""
    me = setup.agent.worker_id
    assert setup.inspector.ping() == {me: "pong"}
    assert setup.inspector.registered() == {me: ["ctl.add", "ctl.hold"]}
    stats = setup.inspector.stats()[me]
    assert stats["concurrency"] == 2 and stats["pid"] > 0 and stats["prefetch"] == 4
    setup.hold.delay()
    wait_for(lambda: setup.worker.running == 1, "the task running")
    active = setup.inspector.active()[me]
    assert [a["task"] for a in active] == ["ctl.hold"]


def test_pool_grow_and_shrink_show_in_stats(setup: Setup) -> None:
    me = setup.agent.worker_id
    assert setup.inspector.control("pool-grow", 3) == {me: {"concurrency": 5, "previous": 2}}
    assert setup.inspector.stats()[me]["concurrency"] == 5
    assert setup.inspector.control("pool-shrink", 2)[me]["concurrency"] == 3
    assert setup.inspector.stats()[me]["concurrency"] == 3
    assert setup.inspector.control("pool-shrink", 10)[me]["concurrency"] == 1


def test_cancel_consumer_stops_a_queue_and_add_consumer_resumes(setup: Setup) -> None:
    me, other = setup.agent.worker_id, setup.other
    answer = setup.inspector.control("cancel-consumer", other)
    assert answer == {me: {"queues": [setup.app.settings.default_queue]}}
    setup.release.set()  # the task would end at once, if it ran
    setup.hold.delay()
    # A round trip through the control queue later, the message still waits.
    assert setup.inspector.ping() == {me: "pong"}
    assert setup.app.transport.message_counts([setup.app.queue(other)])[other] == 1
    assert setup.inspector.stats()[me]["done"] == 0

    answer = setup.inspector.control("add-consumer", other)
    assert sorted(answer[me]["queues"]) == sorted([setup.app.settings.default_queue, other])
    wait_for(lambda: setup.worker.execution.done == 1, "the task to run")


def test_bad_commands_answer_errors(setup: Setup) -> None:
    me = setup.agent.worker_id
    last = setup.app.settings.default_queue
    setup.inspector.control("cancel-consumer", setup.other)
    assert "last queue" in setup.inspector.control("cancel-consumer", last)[me]["error"]
    assert "not a queue" in setup.inspector.control("add-consumer", "nope")[me]["error"]
    with pytest.raises(ValueError, match="Unknown command"):
        setup.inspector.control("eval")
    with pytest.raises(ValueError, match="takes"):
        setup.inspector.control("pool-grow", "many")


def test_shutdown_is_answered_then_done(setup: Setup) -> None:
    assert setup.inspector.control("shutdown") == {setup.agent.worker_id: "shutting down"}
    wait_for(setup.shutdowns.is_set, "the shutdown")


def test_an_addressed_request_reaches_only_its_worker(setup: Setup) -> None:
    second = ControlAgent(setup.worker, shutdown=lambda: None)
    second.start()
    try:
        everyone = Inspector(setup.app, TIMEOUT).ping()
        assert everyone == {setup.agent.worker_id: "pong", second.worker_id: "pong"}
        only = Inspector(setup.app, TIMEOUT, destination=second.worker_id).ping()
        assert only == {second.worker_id: "pong"}
    finally:
        second.stop()


def _forged(owner: App, /, **fields: Any) -> Envelope:
    body = {
        "v": 1,
        "kind": "request",
        "app": owner.name,
        "scope": scope(owner),
        "id": new_id(),
        "command": "ping",
        "argument": None,
        "reply_to": new_id(),
        "destination": None,
    }
    body.update(fields)
    return Envelope(json.dumps(body).encode(), message_id=new_id())


def test_forged_messages_are_rejected_and_the_worker_runs_on(setup: Setup) -> None:
    app = setup.app
    forged = {
        "unknown_command": _forged(app, command="exec"),
        "unexpected_field": _forged(app, module="os", callable="system", argument=None),
        "wrong_scope": _forged(app, scope="other-vhost|{mqtasks}"),
        "wrong_app": _forged(app, app="someone-else"),
        "bad_argument": _forged(app, command="pool-grow", argument="__import__('os')"),
        "not_json": Envelope(b"\x80\x04\x95 pickle", message_id=new_id()),
        "oversized": Envelope(b"{" + b" " * MAX_BODY + b"}", message_id=new_id()),
        "not_an_object": Envelope(b"[1, 2]", message_id=new_id()),
    }
    key = f"{app_word(app)}.ctl.all"
    with capture_logs() as logs:
        for envelope in forged.values():
            app.transport.emit(CONTROL_EXCHANGE, key, envelope, mandatory=False)

        def reasons() -> set[str] | None:
            found = {e["reason"] for e in logs if e["event"] == "control.rejected"}
            return found if found >= set(forged) else None

        wait_for(reasons, lambda: f"rejections of {sorted(forged)}, logged: {logs}")
    assert setup.worker.concurrency == 2
    assert setup.inspector.ping() == {setup.agent.worker_id: "pong"}
    assert not setup.shutdowns.is_set()


def test_a_genuine_request_passes_the_checks(setup: Setup) -> None:
    """The forged-message test's builder makes valid requests when nothing is changed."""
    reply = new_id()
    with capture_logs() as logs:
        setup.app.transport.emit(
            CONTROL_EXCHANGE,
            f"{app_word(setup.app)}.ctl.all",
            _forged(setup.app, reply_to=reply),
            mandatory=False,
        )
        wait_for(lambda: any(e["event"] == "control.command" for e in logs), "the command")
    assert not [e for e in logs if e["event"] == "control.rejected"]
    assert encode(setup.app, "goodbye", worker_id="x").body.startswith(b"{")


def test_redis_kombu_refuses_remote_control() -> None:
    app = App(unique_name("ctl"), broker="redis+kombu://127.0.0.1:6379/9")
    with pytest.raises(ConfigurationError, match=r"redis\+kombu:// cannot carry heartbeats"):
        Inspector(app)
    with pytest.raises(ConfigurationError, match="Use amqp://, redis:// or memory://"):
        HeartbeatMonitor(app)
    worker = Worker(app)
    with capture_logs() as logs:
        ControlAgent(worker).start()  # the worker runs on without it
    assert [e["event"] for e in logs] == ["control.unavailable"]


# -- mqtasks worker processes ------------------------------------------------------------


@pytest.fixture(params=["amqp", "redis"])
def real_url(request: pytest.FixtureRequest) -> str:
    return require_broker(request.param)


class Cli:
    """``mqtasks worker -A tests.control_app`` processes of one app, and that app here."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        from tests.control_app import make_app

        self.name, self.queue = unique_name("ctlcli"), unique_name("q")
        self.app = make_app(url, self.name, self.queue)
        self.env = clean_env(
            MQTASKS_BROKER_URL=url,
            CONTROL_TEST_APP=self.name,
            CONTROL_TEST_QUEUE=self.queue,
            MQTASKS_LOG_FORMAT="json",
        )
        self.tmp_path = tmp_path
        self.workers: list[CliWorker] = []

    def start(self, *args: str) -> CliWorker:
        n = len(self.workers)
        err, out = self.tmp_path / f"w{n}.err", self.tmp_path / f"w{n}.out"
        with open(err, "ab") as e, open(out, "ab") as o:
            proc = subprocess.Popen(
                [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.control_app", *args],
                cwd=ROOT,
                env=self.env,
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = CliWorker(proc, err, out)
        self.workers.append(worker)
        return worker

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([PYTHON, "-m", "mqtasks", *args, "-A", "tests.control_app"], self.env)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        cleanup(self.app)


@pytest.fixture
def cli(real_url: str, tmp_path: Path) -> Iterator[Cli]:
    c = Cli(real_url, tmp_path)
    yield c
    c.close()


def test_a_killed_worker_is_shown_lost_within_10_s(cli: Cli) -> None:
    with HeartbeatMonitor(cli.app) as monitor:
        worker = cli.start()
        view = wait_for(
            lambda: next((v for v in monitor.workers() if v.heartbeat.pid == worker.pid), None),
            "the worker's heartbeat",
        )
        assert not view.lost and view.heartbeat.queues == [cli.queue]
        worker.signal(signal.SIGKILL)
        worker.wait(10)
        # Three missed heartbeats: lost within LOST_AFTER (6 s) plus a heartbeat.
        wait_for(
            lambda: all(v.lost for v in monitor.workers()),
            lambda: f"the worker shown lost: {monitor.workers()}",
            timeout=10.0,
        )
        assert [v.heartbeat.worker_id for v in monitor.workers()] == [view.heartbeat.worker_id]


@pytest.mark.parametrize("processes", [1, 2])
def test_cli_inspect_then_shutdown_stops_the_whole_worker(cli: Cli, processes: int) -> None:
    worker = cli.start("--processes", str(processes), "-c", "3")
    worker.wait_log("control.started", processes)

    def answered() -> list[str] | None:
        pinged = cli.command("inspect", "ping", "--json")
        found = sorted(json.loads(pinged.stdout)) if pinged.returncode == 0 else []
        return found if len(found) == processes else None

    ids = wait_for(answered, "every child answering ping", timeout=20.0)
    stats = cli.command("inspect", "stats")
    assert stats.returncode == 0, stats.stderr
    assert all(f"{i}:" in stats.stdout for i in ids) and "concurrency: 3" in stats.stdout
    grown = cli.command("control", "pool-grow", "2", "--worker", ids[0])
    assert grown.returncode == 0, grown.stderr
    assert "concurrency: 5" in grown.stdout

    done = cli.command("control", "shutdown", "--worker", ids[0])
    assert done.returncode == 0, done.stderr
    assert f"{ids[0]}: shutting down" in done.stdout
    assert worker.wait(30) == 0
    # Every child stopped cleanly; none was replaced.
    assert len(worker.logs("worker.stopped")) == processes
    assert not worker.logs("supervisor.child_started")[processes:]
    nobody = cli.command("inspect", "ping", "--timeout", "0.5")
    assert nobody.returncode == 3, nobody.stdout + nobody.stderr


def test_cli_refuses_a_bad_command_line(cli: Cli) -> None:
    assert cli.command("control", "pool-grow").returncode == 2
    assert cli.command("control", "pool-grow", "x").returncode == 2
    assert cli.command("control", "shutdown", "now").returncode == 2
    assert cli.command("inspect", "reboot").returncode == 2
