"""Autoscaling: the policy, and a worker's threads following a backlog on every broker.

A backlog of tasks that hold their thread (until the test lets them go) makes
the worker grow to MAX, never above, with its prefetch window following; once
they are done and the worker idles, it shrinks one thread per idle period to
MIN, never below; every change is logged with its reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from mqtasks import App, _supervise
from mqtasks._scaling import BOUNDS, GROW, IDLE, ScalePolicy
from mqtasks.execution.autoscale import Autoscaler, WorkerLoad
from mqtasks.testing import running_worker
from mqtasks.worker import Worker
from tests._helpers.cli import PYTHON, ROOT, clean_env, json_lines, run
from tests._helpers.wait import wait_for
from tests.test_cli import MakeScenario, RunCli, run_cli, scenario  # noqa: F401
from tests.test_process import at, is_lean_supervisor

# -- the policy -------------------------------------------------------------------


def test_grows_to_what_the_backlog_asks_for_within_max() -> None:
    policy = ScalePolicy(2, 8)
    assert policy.decide(2, busy=2, waiting=3, now=0) == (5, GROW)
    assert policy.decide(5, busy=5, waiting=100, now=1) == (8, GROW)
    assert policy.decide(8, busy=8, waiting=100, now=2) is None


def test_does_not_grow_while_a_slot_is_free_or_nothing_waits() -> None:
    policy = ScalePolicy(1, 8)
    assert policy.decide(4, busy=3, waiting=50, now=0) is None
    assert policy.decide(4, busy=4, waiting=0, now=1) is None


def test_shrinks_one_unit_per_idle_period_down_to_min() -> None:
    policy = ScalePolicy(2, 8, idle=10)
    assert policy.decide(4, busy=1, waiting=0, now=0) is None  # the idle period starts
    assert policy.decide(4, busy=3, waiting=0, now=9) is None
    assert policy.decide(4, busy=0, waiting=0, now=10) == (3, IDLE)
    assert policy.decide(3, busy=0, waiting=0, now=15) is None
    assert policy.decide(3, busy=0, waiting=0, now=20) == (2, IDLE)
    assert policy.decide(2, busy=0, waiting=0, now=100) is None


def test_work_waiting_or_every_slot_busy_restarts_the_idle_period() -> None:
    policy = ScalePolicy(1, 8, idle=10)
    policy.decide(4, busy=0, waiting=0, now=0)
    policy.decide(4, busy=4, waiting=0, now=5)  # every slot used once: not idle
    assert policy.decide(4, busy=0, waiting=0, now=12) is None
    policy.decide(4, busy=0, waiting=1, now=13)
    assert policy.decide(4, busy=0, waiting=0, now=20) is None
    assert policy.decide(4, busy=0, waiting=0, now=30) == (3, IDLE)


def test_process_units_grow_by_the_backlog_over_their_threads() -> None:
    policy = ScalePolicy(1, 6, idle=1, unit=4)
    assert policy.decide(2, busy=8, waiting=9, now=0) == (5, GROW)
    # A whole child's threads to spare before one goes
    assert policy.decide(2, busy=5, waiting=0, now=1) is None
    assert policy.decide(2, busy=5, waiting=0, now=3) is None
    assert policy.decide(2, busy=4, waiting=0, now=4) is None
    assert policy.decide(2, busy=4, waiting=0, now=5) == (1, IDLE)


def test_a_size_outside_the_bounds_is_corrected() -> None:
    assert ScalePolicy(2, 4).decide(8, busy=0, waiting=0, now=0) == (4, BOUNDS)
    assert ScalePolicy(2, 4).decide(1, busy=1, waiting=9, now=0) == (2, BOUNDS)


@pytest.mark.parametrize(("minimum", "maximum"), [(0, 4), (3, 2), (-1, -1)])
def test_impossible_bounds_are_refused(minimum: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="1 <= MIN <= MAX"):
        ScalePolicy(minimum, maximum)


def test_the_backlog_counts_ordered_tasks_waiting_in_their_partitions(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task(ordering_key="user", partitions=4)
    def keyed(user: int) -> None: ...

    @app.task
    def plain() -> None: ...

    # Given ordered tasks over four partitions and plain ones, and no worker running
    for user in range(6):
        keyed.delay(user)
    plain.delay()

    # Then the load reading counts both: an ordered task is in its partition's queue
    assert WorkerLoad(Worker(app)).ready() == 7


# -- a worker on each broker -----------------------------------------------------------


def _autoscaled(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "worker.autoscaled"]


def test_worker_grows_under_a_backlog_and_shrinks_when_idle(
    broker_url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(broker_url)
    gate = threading.Event()
    started: list[int] = []

    @app.task
    def slow(n: int) -> None:
        started.append(n)
        gate.wait(60)

    # Given a worker of 1 thread that may grow to 4, and 20 tasks that hold their thread
    with structlog.testing.capture_logs() as logs, running_worker(app, concurrency=1) as worker:
        scaler = Autoscaler(worker, 1, 4, idle=0.3, interval=0.1)
        scaler.start()
        try:
            for n in range(20):
                slow.delay(n)

            # Then it grows to 4, with a prefetch window of 8
            wait_for(lambda: worker.concurrency == 4, "growth to 4 threads", 30)
            wait_for(lambda: len(started) == 4, "4 tasks running at once", 30)
            consumer = worker._consumer
            assert consumer is not None
            wait_for(lambda: consumer.prefetch == 8, "prefetch 8", 10)
            assert worker.prefetch == 8
            # And not above 4 while the backlog stays (a few readings more)
            readings = scaler.interval * 5
            assert not gate.wait(readings)
            assert worker.concurrency == 4 and len(started) == 4

            # When the tasks are let go and the queue runs dry
            gate.set()
            wait_for(lambda: len(started) == 20, "all 20 tasks started", 30)

            # Then it shrinks to 1, one thread per idle period, prefetch following
            wait_for(lambda: worker.concurrency == 1, "shrinking to 1 thread", 30)
            wait_for(lambda: consumer.prefetch == 2, "prefetch 2", 10)
        finally:
            scaler.stop()
    changes = _autoscaled(logs)
    assert [c["reason"] for c in changes][:1] == [GROW]
    assert all(1 <= c["concurrency"] <= 4 for c in changes)
    grown = [c for c in changes if c["reason"] == GROW]
    assert grown[0]["previous"] == 1 and grown[0]["busy"] == 1 and grown[0]["waiting"] > 0
    shrunk = [(c["previous"], c["concurrency"]) for c in changes if c["reason"] == IDLE]
    assert shrunk == [(4, 3), (3, 2), (2, 1)]
    assert all(c["idle_s"] >= 0.3 for c in changes if c["reason"] == IDLE)


def test_a_worker_outside_the_bounds_is_brought_within_them_at_start(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    with structlog.testing.capture_logs() as logs, running_worker(app, concurrency=8) as worker:
        scaler = Autoscaler(worker, 2, 4, idle=60)
        scaler.start()
        scaler.stop()
        assert worker.concurrency == 4
    assert [(c["previous"], c["concurrency"], c["reason"]) for c in _autoscaled(logs)] == [
        (8, 4, BOUNDS)
    ]


# -- mqtasks worker --autoscale ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--autoscale", "3,2"], "1 <= MIN <= MAX"),
        (["--autoscale", "0,2"], "1 <= MIN <= MAX"),
        (["--autoscale", "two"], "not MIN,MAX"),
        (["--autoscale", "1,2,3"], "not MIN,MAX"),
        (["--autoscale", "1,8", "--prefetch", "4"], "below the autoscale MAX"),
    ],
)
def test_impossible_autoscale_options_are_usage_errors(args: list[str], says: str) -> None:
    done = run([PYTHON, "-m", "mqtasks", "worker", "-A", "tests.cli_app", *args])
    assert done.returncode == 2, done.stderr
    assert says in done.stderr


def test_a_prefetch_setting_below_the_autoscale_max_is_a_usage_error() -> None:
    env = clean_env(MQTASKS_PREFETCH="4")
    argv = [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.cli_app", "--autoscale", "1,8"]
    done = run(argv, env=env)
    assert done.returncode == 2, done.stderr
    assert "the prefetch setting (4) is below the autoscale MAX (8)" in done.stderr


def test_cli_worker_threads_grow_under_a_backlog_and_shrink_when_idle(
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("redis")
    worker = run_cli(s, "--autoscale", "1,3", "--autoscale-idle", "1", "-c", "8")
    worker.wait_started()
    assert worker.logs("worker.concurrency_ignored")
    assert worker.logs("worker.started")[0]["concurrency"] == 1
    for i in range(9):
        s.send(f"t{i}", 1.5)

    # Then it grows to 3 threads (in one step, unless a reading fell amid the publishing)
    worker.wait_log("worker.autoscaled")
    wait_for(lambda: len(s.record.tags(prefix="t")) == 9, "9 finished tasks", 60)
    # And once idle, it shrinks one thread at a time to 1
    wait_for(lambda: worker.logs("worker.autoscaled")[-1]["concurrency"] == 1, "1 thread", 60)
    changes = [
        (c["previous"], c["concurrency"], c["reason"]) for c in worker.logs("worker.autoscaled")
    ]
    grown = [c for c in changes if c[2] == GROW]
    assert grown[0][0] == 1 and grown[-1][1] == 3
    assert changes[len(grown) :] == [(3, 2, IDLE), (2, 1, IDLE)]
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.stderr()


def test_cli_processes_grow_under_a_backlog_and_retire_when_idle(
    scenario: MakeScenario,  # noqa: F811
    run_cli: RunCli,  # noqa: F811
) -> None:
    s = scenario("amqp")
    supervisor = run_cli(
        s, "--processes", "1", "--autoscale", "1,3", "--autoscale-idle", "1", "-c", "1"
    )
    supervisor.wait_started()
    # The scaling goes on in the supervisor that imports only the standard library
    wait_for(lambda: is_lean_supervisor(supervisor.pid), "the supervisor's handover")
    for i in range(12):
        s.send(f"p{i}", 2.0)

    # Then it grows to 3 children (never more), which share the tasks
    supervisor.wait_log("supervisor.child_started", 3, timeout=60)
    wait_for(lambda: len(s.record.tags(prefix="p")) == 12, "12 finished tasks", 90)
    assert len(s.record.pids(prefix="p")) >= 2
    # And once idle, retires them one at a time down to 1
    supervisor.wait_log("supervisor.child_retired", 2, timeout=60)
    changes = [
        (c["previous"], c["processes"], c["reason"])
        for c in supervisor.logs("supervisor.autoscaled")
    ]
    grown = [c for c in changes if c[2] == GROW]
    assert grown[0][0] == 1 and grown[-1][1] == 3
    assert changes[len(grown) :] == [(3, 2, IDLE), (2, 1, IDLE)]
    assert len(supervisor.logs("supervisor.child_started")) == 3
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(20) == 0, supervisor.stderr()
    assert not supervisor.logs("supervisor.child_died")


# -- the supervisor's reading of its children's reports ------------------------------------


def _report(directory: Path, slot: int, pid: int, **load: Any) -> None:
    report = {"pid": pid, "concurrency": 2, "busy": 0, "ready": 0, "held": 0, "at": time.time()}
    (directory / f"{slot}.json").write_text(json.dumps({**report, **load}))


def _supervision(directory: Path, processes: int, **options: Any) -> _supervise.Supervision:
    scaling = _supervise.Autoscaling(1, 4, 0.0, str(directory), interval=0.0)
    log = _supervise.LogLines("critical")
    children = {slot: 1000 + slot for slot in range(processes)}
    return _supervise.Supervision(["true"], processes, log, children, scaling=scaling, **options)


def test_the_supervisor_grows_by_the_backlog_over_a_child_s_threads(tmp_path: Path) -> None:
    s = _supervision(tmp_path, 2)
    assert s.scaling is not None
    _report(tmp_path, 0, 1000, busy=2, ready=5, held=1)
    # A child that has not reported yet (starting): no decision
    assert s.scaling.decide(s) is None
    _report(tmp_path, 1, 1000 + 1, busy=2, ready=4, held=0)
    # Every thread busy, 5 ready + 1 held waiting: 3 children more (2 threads each), capped at 4
    assert s.scaling.decide(s) == (4, GROW, {"busy": 4, "waiting": 6, "idle_s": 0.0})


def test_the_supervisor_ignores_stale_reports_and_those_of_an_earlier_child(
    tmp_path: Path,
) -> None:
    s = _supervision(tmp_path, 1)
    assert s.scaling is not None
    _report(tmp_path, 0, 999, busy=2, ready=9)  # the child that was in the slot before
    assert s.scaling.decide(s) is None
    _report(tmp_path, 0, 1000, busy=2, ready=9, at=time.time() - 60)
    assert s.scaling.decide(s) is None
    _report(tmp_path, 0, 1000, busy=2, ready=None)  # it cannot read the broker now
    assert s.scaling.decide(s) is None


def test_the_supervisor_retires_one_child_after_the_idle_period_not_counting_retiring_ones(
    tmp_path: Path,
) -> None:
    s = _supervision(tmp_path, 3, retiring=[3])
    s.children[3] = 1003  # retiring: its report no longer counts
    assert s.scaling is not None
    for slot in range(3):
        _report(tmp_path, slot, 1000 + slot, busy=1)
    assert s.scaling.decide(s) is None  # the idle period starts
    decision = s.scaling.decide(s)
    assert decision is not None and decision[:2] == (2, IDLE)


def test_the_scaling_is_carried_over_the_handover(tmp_path: Path) -> None:
    s = _supervision(tmp_path, 2, retiring=[2])
    state = json.loads(_supervise.handover_state(s))
    assert state["retiring"] == [2]
    again = _supervise.Autoscaling(**state["scaling"])
    assert (again.policy.minimum, again.policy.maximum, again.directory) == (1, 4, str(tmp_path))


#: A stand-in child for the supervisor: it reports the load the test writes to a control
#: file, and on SIGTERM goes on for ``linger`` seconds (finishing its tasks) before it exits.
_FAKE_CHILD = """
import json, os, signal, sys, time
directory, slot = os.environ["MQTASKS_LOAD_DIR"], os.environ["MQTASKS_WORKER_SLOT"]
control, linger = sys.argv[1], float(sys.argv[2])
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.monotonic()))
while not stopping or time.monotonic() - stopping[0] < linger:
    with open(control) as f:
        load = json.load(f)
    report = dict(load, pid=os.getpid(), concurrency=1, held=0, at=time.time())
    path = os.path.join(directory, slot + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    time.sleep(0.05)
"""

_SUPERVISOR = """
import os, sys
from mqtasks import _supervise as s
directory, child = sys.argv[1], sys.argv[2:]
os.environ[s.LOAD_DIR_ENV] = directory
scaling = s.Autoscaling(1, 3, 0.5, directory, interval=0.1)
sys.exit(s.Supervision(child, 1, s.LogLines("info", "json"), scaling=scaling).run())
"""


def _write(path: Path, load: dict[str, int]) -> None:
    """Replace ``path`` whole: the stand-in children read it all the time."""
    aside = path.with_suffix(".tmp")
    aside.write_text(json.dumps(load))
    os.replace(aside, path)


def test_a_slot_grown_again_while_its_child_retires_is_refilled_when_it_exits(
    tmp_path: Path,
) -> None:
    control = tmp_path / "load.json"
    _write(control, {"busy": 1, "ready": 5})
    loads = tmp_path / "loads"
    loads.mkdir()
    stderr = tmp_path / "supervisor.err"
    child = [PYTHON, "-c", _FAKE_CHILD, str(control), "1.5"]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [PYTHON, "-c", _SUPERVISOR, str(loads), *child], cwd=ROOT, stderr=err
        )
    try:

        def events(name: str) -> list[dict[str, Any]]:
            return json_lines(stderr.read_text(), name)

        # Given 3 children, grown for a backlog
        wait_for(lambda: len(events("supervisor.child_started")) == 3, "3 children", 30)
        # When they idle, one retires; and the backlog comes back before it has exited
        _write(control, {"busy": 0, "ready": 0})
        wait_for(lambda: events("supervisor.autoscaled")[-1]["reason"] == IDLE, "a shrink", 30)
        _write(control, {"busy": 1, "ready": 5})
        wait_for(lambda: events("supervisor.child_retired"), "the retired child's exit", 30)

        # Then its slot gets a new child once it has exited, and none counts as died
        wait_for(lambda: len(events("supervisor.child_started")) == 4, "a 4th child", 30)
        changes = [
            (e["previous"], e["processes"], e["reason"]) for e in events("supervisor.autoscaled")
        ]
        assert changes == [(1, 3, GROW), (3, 2, IDLE), (2, 3, GROW)]
        retired = events("supervisor.child_retired")[0]
        assert at(events("supervisor.autoscaled")[-1]) < at(retired)
        started = events("supervisor.child_started")
        assert retired["slot"] == 2 == started[-1]["slot"]
        assert started[-1]["pid"] != retired["pid"]
        assert not events("supervisor.child_died")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, stderr.read_text()
    assert not loads.exists(), "the supervisor removes the reports' directory"
