"""The scheduler: one leader sends each tick once; a follower takes over and fills the gap."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from mqtasks import App, current_message
from mqtasks.exceptions import ConfigurationError
from mqtasks.message import PERIODIC_HEADER
from mqtasks.scheduler import Scheduler
from mqtasks.testing import drain, running_worker

T0 = 1_800_000_000.0  # a whole second, far from any DST change (UTC)


class Clocks:
    """A wall clock and a monotonic clock that only move when told."""

    def __init__(self) -> None:
        self.wall = T0 + 0.05
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def app() -> Iterator[App]:
    app = App("sched", broker="memory://", backend="memory://")
    yield app
    app.close()


def _scheduler(app: App, clocks: Clocks, **options: Any) -> Scheduler:
    return Scheduler(app, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono, **options)


def _run_all(app: App) -> None:
    with running_worker(app, concurrency=1) as worker:  # one at a time: dedupe is sequential
        drain(worker)


def _every_second(app: App, ran: list[str], **options: Any) -> None:
    @app.periodic(every=1, name="tick", **options)
    def tick() -> None:
        message = current_message()
        assert message is not None
        assert message.headers.get(PERIODIC_HEADER) == "tick"
        ran.append(message.id)


def test_the_leader_sends_each_tick_once_with_its_id(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    scheduler = _scheduler(app, clocks)
    for _ in range(3):
        scheduler.turn()
        scheduler.turn()  # a second turn in the same second sends nothing more
        clocks.advance(1.0)
    _run_all(app)
    assert sorted(ran) == [
        "periodic:tick:2027-01-15T08:00:00Z",
        "periodic:tick:2027-01-15T08:00:01Z",
        "periodic:tick:2027-01-15T08:00:02Z",
    ]


def test_two_schedulers_send_each_tick_once(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    first, second = _scheduler(app, clocks), _scheduler(app, clocks)
    for _ in range(5):
        second.turn()
        first.turn()
        clocks.advance(1.0)
    _run_all(app)
    assert len(ran) == 5 == len(set(ran))
    assert (first.token is None) != (second.token is None)  # exactly one leads


def test_a_follower_takes_over_and_sends_the_gap_once(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran, catch_up="all")
    clocks = Clocks()
    leader, follower = (
        _scheduler(app, clocks, lease_ttl=0.5),
        _scheduler(app, clocks, lease_ttl=0.5),
    )
    leader.turn()
    assert leader.token is not None
    follower.turn()
    assert follower.token is None
    clocks.advance(4.0)  # the leader is gone: 4 ticks fall in the gap
    time.sleep(0.6)  # its lease expires (on the backend's own clock)
    follower.turn()
    assert follower.token is not None and follower.token > leader.token
    # The old leader comes back: its lease is lost, it sends nothing.
    leader.turn()
    assert leader.token is None
    _run_all(app)
    assert [r.rsplit(":", 3)[-1] for r in sorted(ran)] == ["00Z", "01Z", "02Z", "03Z", "04Z"]


def test_catch_up_latest_sends_only_the_newest_missed_tick(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)  # catch_up="latest" by default
    clocks = Clocks()
    leader, follower = (
        _scheduler(app, clocks, lease_ttl=0.5),
        _scheduler(app, clocks, lease_ttl=0.5),
    )
    leader.turn()
    clocks.advance(4.0)
    time.sleep(0.6)
    follower.turn()
    _run_all(app)
    assert [r.rsplit(":", 3)[-1] for r in sorted(ran)] == ["00Z", "04Z"]


def test_a_leader_that_lost_its_lease_claims_nothing(app: App) -> None:
    """Fencing: a frozen leader still believing it leads publishes nothing."""
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    frozen, other = _scheduler(app, clocks, lease_ttl=0.5), _scheduler(app, clocks, lease_ttl=0.5)
    frozen.turn()
    stale_token = frozen.token
    time.sleep(0.6)
    other.turn()  # takes the lease and sends the tick of this second
    assert other.token is not None and stale_token is not None
    clocks.advance(1.0)
    # The frozen one resumes inside its send: its claim is fenced off by the backend.
    frozen._send([(app.schedules.get("tick"), T0 + 1)])
    assert frozen.token is None
    _run_all(app)
    assert ran == ["periodic:tick:2027-01-15T08:00:00Z"]


def test_a_frozen_leader_publishes_nothing_past_its_safe_lease_time(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    scheduler = _scheduler(app, clocks, lease_ttl=5.0)
    scheduler.turn()
    clocks.mono += 4.5  # frozen between the lease check and the publish
    clocks.wall += 1.0
    scheduler._send([(app.schedules.get("tick"), T0 + 1)])
    assert scheduler.token is None
    _run_all(app)
    assert ran == ["periodic:tick:2027-01-15T08:00:00Z"]


def test_a_tick_claimed_by_a_dead_leader_is_sent_again_and_runs_once(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    dead, heir = _scheduler(app, clocks, lease_ttl=0.5), _scheduler(app, clocks, lease_ttl=0.5)
    dead.turn()  # sends 00
    clocks.advance(1.0)
    schedule = app.schedules.get("tick")
    tick_id = schedule.tick_id(T0 + 1)
    # It claimed and published 01, then died before recording it as sent.
    assert dead.token is not None
    claim = f"periodic:{app.name}:sent:{tick_id}"
    assert app.backend.claim_fenced(f"periodic:{app.name}:leader", dead.token, [claim], 60)
    app.send(dead._message(schedule, T0 + 1, tick_id))
    time.sleep(0.6)
    with structlog.testing.capture_logs() as events:
        heir.turn()
    sent = [e for e in events if e["event"] == "periodic.sent"]
    assert [(e["tick_id"], e["resent"]) for e in sent] == [(tick_id, True)]
    _run_all(app)  # 01 is in the queue twice: it runs once
    assert sorted(ran) == ["periodic:tick:2027-01-15T08:00:00Z", tick_id]


def test_listing_shows_next_run_last_sent_and_leader(app: App) -> None:
    _every_second(app, [])
    clocks = Clocks()
    scheduler = _scheduler(app, clocks, owner="host:1:abc")
    [before] = scheduler.listing()
    assert (before.name, before.last_sent, before.leader) == ("tick", None, None)
    scheduler.turn()
    [after] = scheduler.listing()
    assert (after.last_sent, after.leader, after.schedule) == (T0, "host:1:abc", "every 1s")
    assert after.next_run == T0 + 1


def test_the_scheduler_refuses_to_start_without_a_backend_or_schedules() -> None:
    bare = App("nobackend", broker="memory://")

    @bare.periodic(every=5)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="MQTASKS_BACKEND_URL"):
        Scheduler(bare)
    empty = App("noschedules", broker="memory://", backend="memory://")
    with pytest.raises(ConfigurationError, match="no periodic schedules"):
        Scheduler(empty)


def test_a_bad_schedule_leaves_no_task_registered(app: App) -> None:
    with pytest.raises(ConfigurationError, match="'broken'"):

        @app.periodic(every=-1, name="broken")
        def broken() -> None: ...

    assert not any(name.endswith("broken") for name in app.tasks)


def test_add_periodic_sends_the_signature_with_its_options(app: App) -> None:
    got: list[tuple[str, str]] = []

    @app.task
    def report(kind: str) -> None:
        message = current_message()
        assert message is not None
        got.append((kind, message.queue))

    queue = f"{app.settings.default_queue}.reports"
    app.add_periodic(report.s("daily").set(queue=queue), every=1, name="daily-report")
    clocks = Clocks()
    _scheduler(app, clocks).turn()
    with running_worker(app, queues=[queue]) as worker:
        drain(worker)
    assert got == [("daily", queue)]


def test_run_in_a_thread_stops_and_gives_up_the_lease(app: App) -> None:
    _every_second(app, [])
    scheduler = Scheduler(app, lease_ttl=5.0, owner="me")
    scheduler.start()
    deadline = time.monotonic() + 5
    while app.backend.lease_holder(f"periodic:{app.name}:leader") is None:
        assert time.monotonic() < deadline
        threading.Event().wait(0.05)
    scheduler.stop()
    assert app.backend.lease_holder(f"periodic:{app.name}:leader") is None


def test_a_tick_prepared_ahead_by_a_leader_that_lost_its_lease_is_sent_once(app: App) -> None:
    ran: list[str] = []
    _every_second(app, ran)
    clocks = Clocks()
    first, second = _scheduler(app, clocks, lease_ttl=0.5), _scheduler(app, clocks, lease_ttl=0.5)
    first.turn()  # sends 00, then claims 01 and builds its message while it waits
    assert list(first._prepared) == ["periodic:tick:2027-01-15T08:00:01Z"]
    time.sleep(0.6)  # its lease expires before 01
    clocks.advance(1.0)
    second.turn()  # takes over: 01 was claimed, never sent
    first.turn()  # its lease is gone: it drops what it prepared
    assert first.token is None and not first._prepared
    _run_all(app)
    assert sorted(ran) == [
        "periodic:tick:2027-01-15T08:00:00Z",
        "periodic:tick:2027-01-15T08:00:01Z",
    ]


def test_an_unexpected_error_in_a_turn_does_not_end_the_scheduler(app: App) -> None:
    _every_second(app, [])
    scheduler = Scheduler(app, lease_ttl=5.0)
    turns = 0

    def failing_turn() -> float:
        nonlocal turns
        turns += 1
        if turns == 1:
            raise KeyError("boom")
        stop.set()
        return 0.0

    scheduler.turn = failing_turn  # type: ignore[method-assign]
    stop = threading.Event()
    scheduler.run(stop)  # returns once the second turn sets stop
    assert turns == 2
