"""The ordering scenario's judgement (S18): per key, no task starts before an earlier one
of its key has finished its first run; checked on fabricated ledgers, in order and not."""

from __future__ import annotations

from reliability.ledger import Event
from reliability.ordering import dead_never_executed, order_figures


def intent(task_id: str, key: str, seq: int) -> Event:
    return Event("intent", task_id, 0.0, info={"order_key": key, "seq": seq})


def run(task_id: str, start: float, done: float | None, pid: int = 1) -> list[Event]:
    out = [Event("start", task_id, start, pid=pid)]
    if done is not None:
        out.append(Event("done", task_id, done, pid=pid))
    return out


def key_in_order(key: str, n: int, t0: float = 1.0) -> list[Event]:
    events = []
    for seq in range(n):
        task_id = f"{key}-{seq}"
        events += [intent(task_id, key, seq), *run(task_id, t0 + seq, t0 + seq + 0.5)]
    return events


def test_tasks_run_one_after_the_other_per_key_pass() -> None:
    f = order_figures([*key_in_order("a", 5), *key_in_order("b", 5, t0=1.2)])
    assert f.violations == []
    assert (f.keys, f.tasks) == (2, 10)


def test_a_task_started_before_the_earlier_one_finished_is_a_violation() -> None:
    # Given a key whose task 1 starts while task 0 still runs
    events = [
        intent("a-0", "a", 0),
        *run("a-0", 1.0, 2.0),
        intent("a-1", "a", 1),
        *run("a-1", 1.5, 2.5, pid=2),
        *key_in_order("b", 3),
    ]
    # Then that task is reported, with the task it overtook
    f = order_figures(events)
    assert len(f.violations) == 1
    v = f.violations[0]
    assert (v["key"], v["seq"], v["overtook_seq"]) == ("a", 1, 0)
    assert v["started_before_done_ms"] == 500.0
    assert f.to_dict()["keys_violated"] == 1


def test_a_later_task_run_before_an_earlier_one_is_a_violation() -> None:
    # Published 0 then 1, but 1 ran to the end before 0 started: 0's first done is later.
    events = [
        intent("a-0", "a", 0),
        intent("a-1", "a", 1),
        *run("a-1", 1.0, 1.5),
        *run("a-0", 2.0, 2.5),
    ]
    f = order_figures(events)
    assert [v["seq"] for v in f.violations] == [1]


def test_only_the_first_run_counts_a_redelivered_earlier_task_does_not_hold_later_ones() -> None:
    # Task 0 finishes, its copy runs again later (a redelivery) while task 1 runs.
    events = [
        intent("a-0", "a", 0),
        *run("a-0", 1.0, 1.5),
        intent("a-1", "a", 1),
        *run("a-1", 2.0, 3.0),
        *run("a-0", 2.2, 2.4, pid=2),
    ]
    assert order_figures(events).violations == []


def test_a_task_killed_mid_run_holds_the_next_until_its_first_finish() -> None:
    # Task 0 starts, its worker dies (no done); it runs again and finishes at 5.0.
    base = [intent("a-0", "a", 0), *run("a-0", 1.0, None), *run("a-0", 4.0, 5.0, pid=2)]
    ok = [*base, intent("a-1", "a", 1), *run("a-1", 5.1, 5.2, pid=2)]
    early = [*base, intent("a-1", "a", 1), *run("a-1", 2.0, 2.2, pid=3)]
    assert order_figures(ok).violations == []
    assert [v["seq"] for v in order_figures(early).violations] == [1]


def test_a_task_that_never_finished_does_not_hold_the_key_and_is_listed() -> None:
    # Task 1 was dead-lettered (never ran); task 2 runs after task 0 finished.
    events = [
        intent("a-0", "a", 0),
        *run("a-0", 1.0, 1.5),
        intent("a-1", "a", 1),
        Event("dead", "a-1", 1.6, info={"reason": "sequence_gap"}),
        intent("a-2", "a", 2),
        *run("a-2", 2.0, 2.5),
    ]
    f = order_figures(events)
    assert f.violations == []
    assert f.unfinished == {"a": [1]}


def test_dead_letters_of_tasks_that_never_finished_are_listed_by_reason() -> None:
    dead = {"order_key": "a", "seq": 1, "reason": "sequence_gap"}
    events = [
        *run("a-0", 1.0, 1.5),
        Event("dead", "a-0", 2.0, info={**dead, "seq": 0}),  # a late copy of a task that ran
        Event("dead", "a-1", 2.1, info=dead),
        Event("dead", "a-1", 2.2, info=dead),  # listed once
    ]
    assert dead_never_executed(events) == {"sequence_gap": [{"id": "a-1", "key": "a", "seq": 1}]}
