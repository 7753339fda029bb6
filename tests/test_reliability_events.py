"""The events scenario's judgement (S17): per-group figures from ledger events, where one
event is one ledger id per subscriber group."""

from __future__ import annotations

from reliability.event_tasks import GROUPS, group_key, payload_key
from reliability.events import EventPlan, group_figures
from reliability.ledger import Event


def emitted(key: str, t: float = 0.0) -> list[Event]:
    plan = EventPlan(key, 1.0)
    return [Event(kind, i, t) for i in plan.ids for kind in ("intent", "confirmed")]


def ran(key: str, group: int, t: float = 1.0) -> list[Event]:
    i = group_key(key, group)
    return [Event("start", i, t, pid=1), Event("done", i, t + 0.01, pid=1)]


def test_an_event_one_group_never_ran_is_lost_in_that_group_only() -> None:
    events = [*emitted("e1"), *emitted("e2")]
    for g in range(GROUPS):
        events += ran("e1", g)
        if g != 1:
            events += ran("e2", g)
    f = group_figures(events)
    assert f["g1"]["lost"] == 1
    assert f["g1"]["executed"] == 1
    assert [f[f"g{g}"]["lost"] for g in (0, 2)] == [0, 0]
    assert all(f[f"g{g}"]["confirmed"] == 2 for g in range(GROUPS))


def test_a_group_running_an_event_twice_is_a_duplicate_of_that_group() -> None:
    events = emitted("e1")
    for g in range(GROUPS):
        events += ran("e1", g)
    events += ran("e1", 2, t=5.0)
    f = group_figures(events)
    assert f["g2"]["executed_more_than_once"] == 1
    assert f["g0"]["executed_more_than_once"] == f["g1"]["executed_more_than_once"] == 0


def test_a_dead_lettered_event_is_not_lost_and_counts_by_reason() -> None:
    events = emitted("e1")
    events += [*ran("e1", 0), *ran("e1", 1)]
    events.append(Event("dead", group_key("e1", 2), 2.0, info={"reason": "delivery_limit"}))
    f = group_figures(events)
    assert f["g2"]["lost"] == 0
    assert f["g2"]["dead_lettered"] == {"delivery_limit": 1}


def test_payload_key_of_dead_letters() -> None:
    assert payload_key({"key": "S17-1", "ms": 2.0}) == "S17-1"
    assert payload_key({"ms": 2.0}) is None
    assert payload_key(["S17-1"]) is None
