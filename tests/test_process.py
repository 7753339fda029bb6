"""``mqtasks worker --processes N``: children forked from a supervisor that holds no connection.

Real ``python -m mqtasks worker -A tests.cli_app`` processes on the local RabbitMQ,
started with the ``scenario`` and ``run_cli`` fixtures of ``tests/test_cli.py``. A forked
child keeps the command line the supervisor was started with; a child started as a fresh
interpreter has ``--processes 1`` in its own, which is how these tests tell the two apart.
Once its first children run, the supervisor is ``mqtasks/_supervise.py`` (its command line
says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest

from mqtasks import _supervise
from tests._helpers.cli import PYTHON, ROOT, CliWorker, clean_env, session_members
from tests._helpers.wait import wait_for
from tests.test_cli import MakeScenario, RunCli, Scenario, run_cli, scenario  # noqa: F401

#: A scenario, its supervisor, and the pids of the supervisor's two first children.
Started = tuple[Scenario, CliWorker, list[int]]

AMQP_PORT = 5672


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode().split("\0")[:-1]


def broker_connections(pid: int, port: int = AMQP_PORT) -> int:
    """TCP connections process ``pid`` holds to ``port`` (its sockets in the TCP tables)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            next(fh)  # the header
            for line in fh:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes:
                    count += 1
    return count


def is_lean_supervisor(pid: int) -> bool:
    """Whether ``pid`` runs ``mqtasks/_supervise.py`` in an isolated interpreter without site."""
    argv = cmdline(pid)
    return argv[1:4] == ["-I", "-S", _supervise.__file__]


def started_as(worker: CliWorker) -> list[str]:
    """The command line ``worker`` was started with."""
    args = worker.proc.args
    assert isinstance(args, list)
    return [str(arg) for arg in args]


def started_children(parent: CliWorker) -> list[int]:
    return [e["pid"] for e in parent.logs("supervisor.child_started")]


def at(event: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


@pytest.fixture
def start_two(scenario: MakeScenario, run_cli: RunCli) -> Callable[..., Started]:  # noqa: F811
    """Start ``--processes 2`` on RabbitMQ with ``env`` added; return once both consume."""

    def start(**env: str) -> Started:
        s = scenario("amqp")
        s.env_extra.update(env)
        parent = run_cli(s, "--processes", "2", "-c", "1", "--shutdown-timeout", "10")
        parent.wait_started(2)
        return s, parent, started_children(parent)

    return start


@pytest.mark.integration
def test_children_are_forked_and_only_they_connect_to_the_broker(
    start_two: Callable[..., Started],
) -> None:
    s, parent, children = start_two()
    assert len(children) == 2

    # The children are forks of the supervisor (its command line), not new interpreters
    for pid in children:
        assert cmdline(pid) == started_as(parent)
    assert not parent.logs("supervisor.not_forking")
    # And the supervisor then became the program that imports only the standard library
    wait_for(lambda: is_lean_supervisor(parent.pid), "the supervisor's handover")

    # Each child has a connection of its own; the supervisor has none
    for pid in children:
        wait_for(partial(broker_connections, pid), f"child {pid}'s connection")
    assert broker_connections(parent.pid) == 0

    # And they run tasks, each child some of them
    for i in range(20):
        s.send(f"a{i}", 0.05)
    wait_for(lambda: len(s.record.tags(prefix="a")) == 20, "20 finished tasks")
    assert s.record.pids(prefix="a") <= set(children)
    assert broker_connections(parent.pid) == 0

    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()
    assert len(parent.logs("worker.stopped")) == 2
    assert session_members(parent.pid) == []


@pytest.mark.integration
def test_a_killed_child_is_replaced_by_a_new_interpreter_that_runs_tasks(
    start_two: Callable[..., Started],
) -> None:
    s, parent, children = start_two()

    # When one child is killed
    victim = children[0]
    os.kill(victim, signal.SIGKILL)

    # Then the supervisor starts another in its slot: a new interpreter (it holds no app)
    died = parent.wait_log("supervisor.child_died")
    assert died[0]["pid"] == victim
    assert died[0]["code"] == -signal.SIGKILL
    assert died[0]["slot"] == 0 and died[0]["level"] == "warning"
    replacement = parent.wait_log("supervisor.child_started", 3)[-1]["pid"]
    assert replacement not in children
    assert cmdline(replacement)[:3] == [PYTHON, "-m", "mqtasks"]
    assert cmdline(replacement)[-2:] == ["--processes", "1"]
    assert is_lean_supervisor(parent.pid)
    parent.wait_started(3)

    # Which runs tasks too
    for i in range(30):
        s.send(f"b{i}", 0.05)
    wait_for(lambda: len(s.record.tags(prefix="b")) == 30, "30 finished tasks")
    assert replacement in s.record.pids(prefix="b")
    assert broker_connections(parent.pid) == 0

    # And SIGTERM stops the survivor and the replacement cleanly
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()
    assert len(parent.logs("worker.stopped")) == 2
    assert not parent.logs("worker.forced_exit")
    assert session_members(parent.pid) == []


@pytest.mark.integration
def test_children_that_fail_at_start_up_are_restarted_with_a_growing_pause(
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("amqp")
    # Given a broker URL where nothing listens: every child fails to connect and exits 1
    # (at once: one attempt, a short timeout)
    s.url = "amqp://guest:guest@127.0.0.1:1//"
    s.env_extra.update(MQTASKS_PUBLISH_RETRIES="0", MQTASKS_CONNECT_TIMEOUT="0.5")
    parent = run_cli(s, "--processes", "2", "-c", "1")

    died = parent.wait_log("supervisor.child_died", 6)
    assert {e["code"] for e in died} == {1}
    assert parent.logs("worker.start_failed")
    # The pauses before the restarts double (0.1, 0.1, 0.2, 0.4 s before the 6th start):
    # the supervisor does not spin
    started = parent.wait_log("supervisor.child_started", 6)
    assert (at(started[5]) - at(died[0])).total_seconds() >= 0.8

    # A stop exits 1 if a child that failed is among the last ones, 0 if the stop found
    # only children that had not connected yet
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) in (0, 1), parent.stderr()
    assert session_members(parent.pid) == []


@pytest.mark.integration
def test_a_supervisor_with_a_thread_starts_its_children_as_fresh_interpreters(
    start_two: Callable[..., Started],
) -> None:
    # Given an app module that starts a thread when it is imported
    s, parent, children = start_two(CLI_TEST_THREAD="1")

    # Then the supervisor says why it does not fork, and children are new interpreters
    (why,) = parent.logs("supervisor.not_forking")
    assert any("cli-test-thread" in reason for reason in why["reasons"])
    for pid in children:
        assert cmdline(pid)[-2:] == ["--processes", "1"]
    # And it stays as it is: a stop signal could reach the other thread while it replaced itself
    assert cmdline(parent.pid) == started_as(parent)

    s.send("c")
    wait_for(lambda: s.record.count("finish", "c") == 1, "the task")
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()
    assert session_members(parent.pid) == []


@pytest.mark.integration
def test_an_app_with_statsd_still_forks_its_children(start_two: Callable[..., Started]) -> None:
    """StatsD's socket and flush thread start with the first stat, in each child."""
    s, parent, children = start_two(MQTASKS_STATSD_URL="statsd://127.0.0.1:8125/mqt-test")
    assert not parent.logs("supervisor.not_forking")
    for pid in children:
        assert cmdline(pid) == started_as(parent)
    s.send("c")
    wait_for(lambda: s.record.count("finish", "c") == 1, "the task")
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()


def test_sigterm_while_the_supervisor_imports_the_app_stops_it_before_any_child(
    tmp_path: Path,
) -> None:
    # Given an app module that sleeps while it imports, in the supervisor now
    marker = tmp_path / "importing"
    (tmp_path / "slow_supervised.py").write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(3)\n"
        "from mqtasks import App\napp = App('slow', broker='memory://')\n"
    )
    env = clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    argv = [PYTHON, "-m", "mqtasks", "worker", "-A", "slow_supervised", "--processes", "2"]
    err, out = tmp_path / "err", tmp_path / "out"
    with open(err, "wb") as err_file:
        proc = subprocess.Popen(
            [*argv, "--log-format", "json"],
            cwd=ROOT,
            env=env,
            stderr=err_file,
            start_new_session=True,
        )
    supervisor = CliWorker(proc, err, out)
    try:
        wait_for(marker.exists, "the app's import to begin")
        # When SIGTERM comes in the middle of it
        supervisor.signal(signal.SIGTERM)
        # Then the supervisor exits 0 without starting a child
        assert supervisor.wait(30) == 0, supervisor.stderr()
        assert not supervisor.logs("supervisor.child_started")
    finally:
        supervisor.kill()


@pytest.mark.integration
@pytest.mark.parametrize(("signals", "code"), [(1, 3), (2, 4)], ids=["timeout", "forced"])
def test_the_supervisor_exits_with_its_children_s_stop_code_after_the_handover(
    signals: int,
    code: int,
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("amqp")
    parent = run_cli(s, "--processes", "2", "-c", "1", "--shutdown-timeout", "2")
    parent.wait_started(2)
    wait_for(lambda: is_lean_supervisor(parent.pid), "the supervisor's handover")
    s.send("slow", 20)
    wait_for(lambda: s.record.count("start", "slow") == 1, "the slow task to start")

    # When SIGTERM comes once (the task outlives the grace period) or twice (forced)
    for _ in range(signals):
        parent.signal(signal.SIGTERM)
        wait_for(lambda: parent.logs("worker.stopping"), "the children to hear of it")

    # Then the supervisor exits with the code of the child that ran the task
    assert parent.wait(15) == code, parent.stderr()
    assert session_members(parent.pid) == []


def test_a_stop_signal_pending_across_the_handover_stops_the_children(tmp_path: Path) -> None:
    """SIGTERM blocked before execv stays pending; the new program handles it, not dies of it."""
    # Given a process with a child, SIGTERM blocked and pending, that becomes the
    # supervise program (which would restart a child that died with `command`)
    marker = tmp_path / "restarted"
    program = f"""
import os, signal, sys, time
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
os.kill(os.getpid(), signal.SIGTERM)
state = '{{"processes": 1, "children": {{"0": %d}}, "restarts": [], "log_level": "info", "log_format": "json"}}' % child
command = [sys.executable, "-c", "open({str(marker)!r}, 'w')"]
os.execv(sys.executable, [sys.executable, "-I", "-S", {_supervise.__file__!r}, state, *command])
"""
    proc = subprocess.run(
        [PYTHON, "-c", program], cwd=ROOT, env=clean_env(), capture_output=True, timeout=30
    )
    # Then the supervisor passed it on: the child, killed before it had a handler, is a
    # clean stop (exit 0), and was not replaced
    assert proc.returncode == 0, proc.stderr.decode()
    assert not marker.exists()
    assert b"supervisor.child_started" not in proc.stderr


def test_supervisor_events_are_rendered_as_structlog_renders_the_worker_s() -> None:
    """The supervise program writes its events without structlog, in the same format."""
    import io
    import re

    import structlog

    from mqtasks import logging as logs

    events: list[tuple[str, str, dict[str, object]]] = [
        ("info", "supervisor.child_started", {"slot": 0, "pid": 1234}),
        ("warning", "supervisor.child_died", {"slot": 1, "pid": 1235, "code": -9}),
        ("error", "supervisor.start_failed", {"slot": 0, "error": "OSError: [Errno 2] no"}),
    ]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    try:
        for fmt, stream in [("json", io.StringIO()), ("console", io.StringIO()), ("auto", Tty())]:
            used = logs.configure_logging("info", fmt, stream=stream, background=False)
            ours = _supervise.LogLines("info", fmt, stream=stream)
            assert ours.format == used
            for level, event, fields in events:
                getattr(structlog.get_logger("mqtasks.process"), level)(event, **fields)
                line = stream.getvalue().splitlines()[-1]
                plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
                stamp = (
                    plain.split('"timestamp": "')[-1][:-2] if fmt == "json" else plain.split()[0]
                )
                assert ours.render(level, event, fields, stamp) == line
    finally:
        logs.configure_logging("info", "json", background=False)
        structlog.reset_defaults()


def test_supervisor_events_below_the_log_level_are_not_written() -> None:
    import io

    stream = io.StringIO()
    log = _supervise.LogLines("warning", "json", stream=stream)
    log.info("supervisor.child_started", slot=0, pid=1)
    log.warning("supervisor.child_died", slot=0, pid=1, code=1)
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "supervisor.child_died"
    ]
    assert _supervise.timestamp(0.5) == "1970-01-01T00:00:00.500000Z"
    assert _supervise.timestamp(1.0) == "1970-01-01T00:00:01Z"  # as datetime.isoformat()


def test_exit_codes_are_the_same_in_the_supervise_program() -> None:
    from mqtasks import process

    for name in ("RET_OK", "RET_ERROR", "RET_TIMEOUT", "RET_FORCED"):
        assert getattr(_supervise, name) == getattr(process, name)
