"""Periodic schedules: tick maths, catch-up policies, validation, registry. No broker; `now` is passed in."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mqtasks import App
from mqtasks.exceptions import ConfigurationError
from mqtasks.periodic import (
    HORIZON,
    MAX_PER_TURN,
    ON_TIME,
    PeriodicRegistry,
    Schedule,
    make_schedule,
)
from mqtasks.task import Task

BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Epoch seconds of a UTC wall time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()


def berlin(tick: float) -> str:
    """A tick as Europe/Berlin wall time with its offset, e.g. '2026-03-29 03:00+02:00'."""
    return datetime.fromtimestamp(tick, BERLIN).strftime("%Y-%m-%d %H:%M%z")


@pytest.fixture
def task() -> Task[..., Any]:
    app = App("periodic", broker="memory://", default_queue="work")

    @app.task
    def cleanup(days: int = 7, *, dry_run: bool = False) -> None: ...

    return cleanup


@pytest.fixture
def needs_days() -> Task[..., Any]:
    app = App("periodic", broker="memory://", default_queue="work")

    @app.task
    def purge(days: int) -> None: ...

    return purge


def sched(task: Task[..., Any], **kw: Any) -> Schedule:
    return make_schedule(kw.pop("name", "cleanup"), task, **kw)


# every=


def test_every_ticks_are_epoch_aligned(task: Task[..., Any]) -> None:
    s = sched(task, every=30)
    assert s.next_tick(utc(2026, 12, 7, 15, 4, 50)) == utc(2026, 12, 7, 15, 5, 0)
    assert s.ticks(utc(2026, 12, 7, 15, 4, 0), utc(2026, 12, 7, 15, 5, 30)) == [
        utc(2026, 12, 7, 15, 4, 30),
        utc(2026, 12, 7, 15, 5, 0),
        utc(2026, 12, 7, 15, 5, 30),
    ]


def test_next_tick_is_strictly_after(task: Task[..., Any]) -> None:
    s = sched(task, every=30)
    tick = utc(2026, 12, 7, 15, 5, 0)
    assert s.next_tick(tick) == tick + 30
    assert s.next_tick(tick - 0.001) == tick


def test_fractional_every_gives_identical_floats_from_any_start(task: Task[..., Any]) -> None:
    """Whatever `after` a process starts from, it computes the same k * every floats."""
    every = 0.1
    s = sched(task, every=every)
    base = utc(2026, 12, 7, 15, 5, 0)
    k0 = round(base / every)
    expected = [k * every for k in range(k0, k0 + 50)]
    got = s.ticks(expected[0] - 0.05, expected[-1])
    assert got == expected
    # Starting from each tick, or anywhere between two, yields the next one bit for bit.
    for i in range(len(expected) - 1):
        assert s.next_tick(expected[i]) == expected[i + 1]
        assert s.next_tick((expected[i] + expected[i + 1]) / 2) == expected[i + 1]


def test_ticks_limit_returns_the_first(task: Task[..., Any]) -> None:
    s = sched(task, every=1)
    t0 = utc(2026, 12, 7, 15, 0, 0)
    assert s.ticks(t0, t0 + 100, limit=3) == [t0 + 1, t0 + 2, t0 + 3]
    assert s.ticks(t0, t0, limit=3) == []


def test_tick_ids(task: Task[..., Any]) -> None:
    s = sched(task, every=0.5)
    assert s.tick_id(utc(2026, 12, 7, 15, 5, 0)) == "periodic:cleanup:2026-12-07T15:05:00Z"
    assert s.tick_id(utc(2026, 12, 7, 15, 5, 0) + 0.5) == (
        "periodic:cleanup:2026-12-07T15:05:00.500Z"
    )
    # Ticks a millisecond apart keep distinct ids.
    ms = sched(task, name="fast", every=0.001)
    ticks = ms.ticks(utc(2026, 12, 7, 15, 5, 0), utc(2026, 12, 7, 15, 5, 1))
    assert len(ticks) == 1000
    assert len({ms.tick_id(t) for t in ticks}) == 1000


def test_describe(task: Task[..., Any]) -> None:
    assert sched(task, every=30).describe() == "every 30s"
    assert sched(task, every=timedelta(milliseconds=500)).describe() == "every 0.5s"
    assert sched(task, cron="*/5 * * * *", tz="Europe/Berlin").describe() == (
        "cron */5 * * * * (Europe/Berlin)"
    )
    assert sched(task, cron="0  9 * * MON").describe() == "cron 0 9 * * MON (UTC)"


# cron=


def test_cron_next_ticks_in_utc(task: Task[..., Any]) -> None:
    s = sched(task, cron="*/5 * * * *")
    assert s.tz == "UTC"
    assert s.next_tick(utc(2026, 12, 7, 15, 4, 59)) == utc(2026, 12, 7, 15, 5)
    assert s.next_tick(utc(2026, 12, 7, 15, 5)) == utc(2026, 12, 7, 15, 10)
    assert s.next_tick(utc(2026, 12, 7, 15, 5) - 0.5) == utc(2026, 12, 7, 15, 5)
    weekly = sched(task, name="weekly", cron="0 9 * * MON")
    # 2026-12-07 is a Monday.
    assert weekly.next_tick(utc(2026, 12, 7, 9, 0)) == utc(2026, 12, 14, 9, 0)


def test_cron_in_europe_berlin(task: Task[..., Any]) -> None:
    s = sched(task, cron="0 9 * * *", tz="Europe/Berlin")
    assert s.next_tick(utc(2026, 12, 7, 0, 0)) == utc(2026, 12, 7, 8, 0)  # CET, +01:00
    assert s.next_tick(utc(2026, 7, 7, 0, 0)) == utc(2026, 7, 7, 7, 0)  # CEST, +02:00


def test_cron_repeated_calls_agree_with_fresh_schedules(task: Task[..., Any]) -> None:
    """The per-schedule memo of the next tick never returns a stale tick."""
    s = sched(task, cron="*/5 * * * *")
    afters = [utc(2026, 12, 7, 15, 0) + x for x in (0, 1, 299, 300, 0, 301, 10_000, 5, 5)]
    for after in afters:
        fresh = sched(task, name="fresh", cron="*/5 * * * *")
        assert s.next_tick(after) == fresh.next_tick(after)


# Europe/Berlin in 2026: clocks go forward on 2026-03-29 (02:00 CET -> 03:00 CEST, at
# 01:00 UTC) and back on 2026-10-25 (03:00 CEST -> 02:00 CET, at 01:00 UTC).
DST_CASES = [
    pytest.param(
        "30 2 * * *",
        (utc(2026, 3, 28), utc(2026, 3, 31)),
        [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)],
        ["2026-03-28 02:30+0100", "2026-03-29 03:00+0200", "2026-03-30 02:30+0200"],
        id="spring-forward-specific-time-runs-once-right-after-the-jump",
    ),
    pytest.param(
        "*/30 * * * *",
        (utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 1, 45)),
        [utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 30)],
        ["2026-03-29 01:30+0100", "2026-03-29 03:00+0200", "2026-03-29 03:30+0200"],
        id="spring-forward-wildcard-follows-real-time",
    ),
    pytest.param(
        "30 2 * * *",
        (utc(2026, 10, 24), utc(2026, 10, 27)),
        [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
        ["2026-10-24 02:30+0200", "2026-10-25 02:30+0200", "2026-10-26 02:30+0100"],
        id="fall-back-specific-time-runs-once-in-the-first-pass",
    ),
    pytest.param(
        "*/30 * * * *",
        (utc(2026, 10, 24, 23, 50), utc(2026, 10, 25, 2, 10)),
        [utc(2026, 10, 25, h, m) for h, m in ((0, 0), (0, 30), (1, 0), (1, 30), (2, 0))],
        [
            "2026-10-25 02:00+0200",
            "2026-10-25 02:30+0200",
            "2026-10-25 02:00+0100",
            "2026-10-25 02:30+0100",
            "2026-10-25 03:00+0100",
        ],
        id="fall-back-wildcard-runs-in-both-passes",
    ),
]


@pytest.mark.parametrize(("expr", "span", "utc_ticks", "local_ticks"), DST_CASES)
def test_cron_across_daylight_saving_changes(
    task: Task[..., Any],
    expr: str,
    span: tuple[float, float],
    utc_ticks: list[float],
    local_ticks: list[str],
) -> None:
    s = sched(task, cron=expr, tz="Europe/Berlin")
    ticks = s.ticks(*span)
    assert ticks == utc_ticks
    assert [berlin(t) for t in ticks] == local_ticks
    # From any point between two ticks, next_tick() names the later one.
    for before, tick in zip([span[0], *ticks[:-1]], ticks, strict=True):
        fresh = sched(task, name="fresh", cron=expr, tz="Europe/Berlin")
        assert fresh.next_tick((before + tick) / 2) == tick
        assert fresh.next_tick(tick - 1) == tick


def test_cron_next_tick_inside_the_changed_hours(task: Task[..., Any]) -> None:
    fixed = sched(task, cron="30 2 * * *", tz="Europe/Berlin")
    # Spring: 00:59:59 UTC is 01:59:59 CET; 02:30 does not exist, 03:00 CEST does.
    assert fixed.next_tick(utc(2026, 3, 29, 0, 59, 59)) == utc(2026, 3, 29, 1, 0)
    assert fixed.next_tick(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 30, 0, 30)
    # Autumn, inside the second pass (02:20 CET): the first-pass 02:30 is past, next is tomorrow.
    assert fixed.next_tick(utc(2026, 10, 25, 1, 20)) == utc(2026, 10, 26, 1, 30)
    assert fixed.next_tick(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1, 30)
    # A wildcard job started inside the second pass continues in it.
    wild = sched(task, name="wild", cron="*/30 * * * *", tz="Europe/Berlin")
    assert wild.next_tick(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 25, 1, 30)


@pytest.mark.parametrize("expr", ["30 2 * * *", "*/30 * * * *", "* 2 * * *", "15 1-3 * * *"])
@pytest.mark.parametrize("day", [(3, 29), (10, 25), (12, 7)])
def test_cron_latest_agrees_with_walking_every_tick(
    task: Task[..., Any], expr: str, day: tuple[int, int]
) -> None:
    """due(catch_up="latest") searches back from now; it finds what a walk from `last` finds."""
    latest = sched(task, cron=expr, tz="Europe/Berlin")
    walk = sched(task, name="walk", cron=expr, tz="Europe/Berlin")
    midnight = utc(2026, day[0], day[1]) - 2 * 3600
    for minutes in range(0, 6 * 60, 7):
        now = midnight + minutes * 60 + 13
        for last in (midnight - 3600, now - 3000, now - 600):
            expected = walk.ticks(last, now, limit=10**6)[-1:]
            assert latest.due(last, now) == expected, (last, now)


# due(): `now` is the controllable clock.


def test_due_first_start_has_no_history(task: Task[..., Any]) -> None:
    t = utc(2026, 12, 7, 15, 5)
    for policy in ("all", "latest", "none"):
        s = sched(task, every=60, catch_up=policy)
        assert s.due(None, t + 0.5) == [t]  # on time
        assert s.due(None, t + 30) == []  # missed before this scheduler ran: not sent
        assert s.due(None, t - 1) == []


def test_due_all_sends_every_missed_tick_oldest_first(task: Task[..., Any]) -> None:
    s = sched(task, every=60, catch_up="all")
    last = utc(2026, 12, 7, 15, 0)
    assert s.due(last, last + 305) == [last + 60 * i for i in range(1, 6)]
    assert s.due(last + 300, last + 305) == []


def test_due_latest_sends_only_the_newest_missed(task: Task[..., Any]) -> None:
    s = sched(task, every=60, catch_up="latest")
    last = utc(2026, 12, 7, 15, 0)
    assert s.due(last, last + 305) == [last + 300]
    assert s.due(last + 300, last + 305) == []
    assert s.due(last, last + 59) == []


def test_due_none_sends_only_an_on_time_tick(task: Task[..., Any]) -> None:
    s = sched(task, every=60, catch_up="none")
    last = utc(2026, 12, 7, 15, 0)
    assert s.due(last, last + 305) == []  # newest missed is 5 s late
    assert s.due(last, last + 300 + ON_TIME) == [last + 300]
    assert s.due(last, last + 300 + ON_TIME + 0.001) == []


def test_due_drops_ticks_beyond_the_horizon(task: Task[..., Any]) -> None:
    s = sched(task, every=3600, catch_up="all")
    now = utc(2026, 12, 7, 15, 30)
    got = s.due(now - 3 * 86400, now)
    assert len(got) == 24
    assert got[0] == utc(2026, 12, 6, 16, 0)
    assert all(now - HORIZON < t <= now for t in got)
    latest = sched(task, name="l", every=3600, catch_up="latest")
    assert latest.due(now - 3 * 86400, now) == [utc(2026, 12, 7, 15, 0)]


def test_due_all_caps_a_turn_at_the_oldest_ticks(task: Task[..., Any]) -> None:
    s = sched(task, every=1, catch_up="all")
    now = utc(2026, 12, 7, 15, 30)
    last = now - 2500
    first = s.due(last, now)
    assert first == [last + i for i in range(1, MAX_PER_TURN + 1)]
    # The scheduler advances `last`; the next turns bring the rest, in order.
    second = s.due(first[-1], now)
    third = s.due(second[-1], now)
    assert second == [last + i for i in range(MAX_PER_TURN + 1, 2 * MAX_PER_TURN + 1)]
    assert third == [last + i for i in range(2 * MAX_PER_TURN + 1, 2501)]
    assert s.due(third[-1], now) == []


def test_due_cron_policies_after_a_gap(task: Task[..., Any]) -> None:
    last = utc(2026, 12, 7, 15, 0)
    now = utc(2026, 12, 7, 15, 17, 30)
    every5 = [utc(2026, 12, 7, 15, m) for m in (5, 10, 15)]
    assert sched(task, cron="*/5 * * * *", catch_up="all").due(last, now) == every5
    assert sched(task, cron="*/5 * * * *", catch_up="latest").due(last, now) == every5[-1:]
    assert sched(task, cron="*/5 * * * *", catch_up="none").due(last, now) == []
    on_time = sched(task, cron="*/5 * * * *", catch_up="none")
    assert on_time.due(last, utc(2026, 12, 7, 15, 15) + 0.5) == every5[-1:]


def test_due_cron_horizon_and_turn_limit(task: Task[..., Any]) -> None:
    s = sched(task, cron="* * * * *", catch_up="all")
    now = utc(2026, 12, 7, 15, 30)
    got = s.due(now - 3 * 86400, now)
    assert len(got) == MAX_PER_TURN
    assert got[0] == now - HORIZON + 60
    assert got == [got[0] + 60 * i for i in range(MAX_PER_TURN)]
    rest = s.due(got[-1], now)
    assert rest[-1] == now and len(rest) == 1440 - MAX_PER_TURN
    latest = sched(task, name="l", cron="* * * * *")
    assert latest.due(now - 3 * 86400, now + 59) == [now]


# Validation: every error names the schedule.


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({}, "exactly one of cron="),
        ({"cron": "* * * * *", "every": 5}, "got both"),
        ({"cron": "61 * * * *"}, "invalid cron expression '61 * * * *' (Bad minute)"),
        ({"cron": "0 0 31 2 *"}, "(Bad day-of-month)"),
        ({"cron": "* * * *"}, "has 4 fields; a cron expression has exactly 5"),
        ({"cron": "0 */5 * * * *"}, "6-field expressions (with seconds) are not supported"),
        ({"cron": 5}, "cron must be a string"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "* * * * *", "tz": ""}, "tz must be an IANA time zone name"),
        ({"every": 10, "tz": "Europe/Berlin"}, "applies to cron schedules only"),
        ({"every": 0}, "every must be a finite duration"),
        ({"every": -5}, "every must be a finite duration"),
        ({"every": float("nan")}, "every must be a finite duration"),
        ({"every": timedelta(0)}, "every must be a finite duration"),
        ({"every": timedelta(seconds=-1)}, "every must be a finite duration"),
        ({"every": "10"}, "every must be a number of seconds or a timedelta"),
        ({"every": True}, "every must be a number of seconds or a timedelta"),
        ({"every": 10, "catch_up": "some"}, "catch_up must be 'all', 'latest' or 'none'"),
        ({"every": 10, "args": (1, 2)}, "do not fit task"),
        ({"every": 10, "kwargs": {"hours": 3}}, "do not fit task"),
        ({"every": 10, "options": {"countdown": 3}}, "unknown options ['countdown']"),
    ],
)
def test_invalid_schedule_is_refused_with_its_name(
    task: Task[..., Any], kw: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as err:
        make_schedule("cleanup", task, **kw)
    assert str(err.value).startswith("Periodic schedule 'cleanup': ")
    assert fragment in str(err.value)


def test_required_argument_missing_is_refused(needs_days: Task[..., Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"^Periodic schedule 'purge': .*'days'"):
        make_schedule("purge", needs_days, every=60)
    s = make_schedule("purge", needs_days, every=60, kwargs={"days": 3})
    assert s.kwargs == {"days": 3} and s.task == needs_days.name


@pytest.mark.parametrize("name", ["", "two words", "tab\there", 7])
def test_invalid_name_is_refused(task: Task[..., Any], name: Any) -> None:
    with pytest.raises(ConfigurationError, match="the name must be a non-empty string"):
        make_schedule(name, task, every=60)


def test_valid_schedule_keeps_what_it_was_given(task: Task[..., Any]) -> None:
    s = make_schedule(
        "cleanup",
        task,
        every=timedelta(minutes=5),
        args=[3],
        kwargs={"dry_run": True},
        options={"queue": "maintenance", "priority": 5, "expires": 60},
        catch_up="all",
    )
    assert (s.every, s.cron, s.tz, s.catch_up) == (300.0, None, "UTC", "all")
    assert (s.args, s.kwargs) == ((3,), {"dry_run": True})
    assert s.options == {"queue": "maintenance", "priority": 5, "expires": 60}
    assert make_schedule("c", task, cron="0 3 * * *", tz="Europe/Berlin").tz == "Europe/Berlin"


# Registry


def test_registry_keeps_order_and_refuses_duplicate_names(task: Task[..., Any]) -> None:
    reg = PeriodicRegistry()
    a = sched(task, name="b-first", every=60)
    b = sched(task, name="a-second", cron="0 * * * *")
    reg.add(a)
    reg.add(b)
    assert list(reg) == [a, b] and len(reg) == 2
    assert reg.names() == ["b-first", "a-second"]
    assert reg.get("a-second") is b
    assert "a-second" in reg and "missing" not in reg
    with pytest.raises(KeyError, match="missing"):
        reg.get("missing")
    with pytest.raises(ConfigurationError, match=r"^Periodic schedule 'b-first': .*already"):
        reg.add(sched(task, name="b-first", every=5))
    assert len(reg) == 2
