"""The time-limit scenario's judgement (S19): what became of the hung tasks and of the
others, and how many tasks each process ran at once; checked on fabricated ledgers."""

from __future__ import annotations

from reliability.ledger import Event, classify
from reliability.timelimits import hung_figures, peak_overlap


def sent(task_id: str) -> list[Event]:
    return [Event("intent", task_id, 0.0), Event("confirmed", task_id, 0.0)]


def ran(task_id: str, start: float, done: float | None, pid: int = 1) -> list[Event]:
    out = [Event("start", task_id, start, pid=pid)]
    if done is not None:
        out.append(Event("done", task_id, done, pid=pid))
    return out


def dead(task_id: str, at: float, reason: str = "time_limit") -> Event:
    return Event("dead", task_id, 99.0, info={"reason": reason, "failed_at": at})


def test_hung_tasks_dead_lettered_as_time_limit_pass() -> None:
    events = [
        *sent("h1"),
        *ran("h1", 1.0, None),
        dead("h1", 3.05),
        *sent("h2"),
        *ran("h2", 1.5, None, pid=2),
        dead("h2", 3.6),
        *sent("w1"),
        *ran("w1", 1.0, 1.1),
    ]
    f = hung_figures(events, {"h1", "h2"})
    assert (f["hung"], f["dead_time_limit"], f["finished"]) == (2, 2, 0)
    assert f["other_reasons"] == {} and f["not_dead"] == [] and f["others_dead"] == {}
    assert f["stop_s"] == {"p50": 2.1, "max": 2.1}
    # and nothing is lost: a dead-lettered hung task counts as settled
    c = classify(events)
    assert (c.lost, c.executed, c.dead_lettered) == (0, 1, {"time_limit": 2})


def test_a_hung_task_never_dead_lettered_or_with_another_reason_is_reported() -> None:
    events = [
        *sent("h1"),
        *ran("h1", 1.0, None),
        *sent("h2"),
        *ran("h2", 1.0, None),
        dead("h2", 1.5, reason="max_retries_exceeded"),
    ]
    f = hung_figures(events, {"h1", "h2"})
    assert f["dead_time_limit"] == 0
    assert f["not_dead"] == ["h1"]
    assert f["other_reasons"] == {"max_retries_exceeded": 1}
    assert classify(events).lost == 1


def test_the_stop_is_timed_from_the_last_start_before_the_dead_letter() -> None:
    # Given a hung task whose first run died with its worker (SIGKILL) and ran again
    events = [*ran("h1", 1.0, None, pid=1), *ran("h1", 6.0, None, pid=2), dead("h1", 8.2)]
    # Then the stop is measured from its second start
    assert hung_figures(events, {"h1"})["stop_s"]["max"] == 2.2


def test_an_ordinary_task_dead_lettered_or_a_hung_task_finished_is_reported() -> None:
    events = [*ran("h1", 1.0, 1.5), dead("w1", 2.0, reason="time_limit"), *ran("w1", 1.0, None)]
    f = hung_figures(events, {"h1"})
    assert f["finished"] == 1
    assert f["others_dead"] == {"time_limit": 1}


def test_peak_overlap_counts_tasks_running_at_once_per_process() -> None:
    events = [
        *ran("a", 0.0, 1.0, pid=1),
        *ran("b", 0.5, 1.5, pid=1),
        *ran("c", 0.9, 2.0, pid=1),
        *ran("d", 1.0, 3.0, pid=1),  # starts as "a" ends: not at once with it
        *ran("e", 0.0, 1.0, pid=2),
        *ran("f", 1.0, 2.0, pid=2),
        *ran("x", 0.0, 5.0, pid=2),  # not in the batch
    ]
    out = peak_overlap(events, {"a", "b", "c", "d", "e", "f"})
    assert out == {1: {"ran": 4, "peak": 3}, 2: {"ran": 2, "peak": 1}}


def test_peak_overlap_ignores_runs_that_never_finished() -> None:
    events = [*ran("a", 0.0, None, pid=1), *ran("a", 1.0, 2.0, pid=2), *ran("b", 1.5, 2.5, pid=2)]
    assert peak_overlap(events, {"a", "b"}) == {2: {"ran": 2, "peak": 2}}
